"""Sharded FAISS index of the catalog (build, read, merge) and per-grade score thresholds."""
