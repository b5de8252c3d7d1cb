"""Search over the catalog: FAISS and BM25 (retrieval), their fusion, the sharded index (build, read, merge)
and the per-grade score thresholds that tier its results."""
