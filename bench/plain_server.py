"""The peer for bench/serve_latency.py: one process, FastAPI + sentence-transformers + FAISS.

What a team writes before it has Ray Serve: the encoder and every shard of the
same index in one uvicorn process, one query per request, no batching.
Run: MR_RAY_INDEX_DIR=<index folder> uvicorn --app-dir bench plain_server:app --port 8100
"""

import os

from fastapi import FastAPI
from sentence_transformers import SentenceTransformer

from mr_ray.retriever.encoder import pretrained_model_path
from mr_ray.search.shards import (
    index_encoder_path,
    open_shards,
    read_index_manifest,
    search_shards,
)

INDEX_DIR = os.environ["MR_RAY_INDEX_DIR"]
manifest = read_index_manifest(INDEX_DIR)
model = SentenceTransformer(index_encoder_path(INDEX_DIR, manifest) or pretrained_model_path(), device="cpu")
model.max_seq_length = manifest["encoder"]["max_seq_length"]
shards = open_shards(INDEX_DIR)
app = FastAPI()


@app.get("/healthz")
def healthz():
    return {"status": "ok"}


@app.get("/search")
def search(query: str, k: int = 10):
    vector = model.encode([query], normalize_embeddings=True, convert_to_numpy=True)
    return {"query": query, "results": search_shards(shards, vector, k).rows(0)}
