"""Sharded FAISS + BM25 index of the catalog (build, read, merge), hybrid fusion, and per-grade score thresholds."""
