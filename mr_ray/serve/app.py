"""Online search on Ray Serve: query encoder + one searcher per shard (FAISS + BM25) + HTTP ingress.

    HTTP -> SearchIngress --(one query)--> QueryEncoder (batched, autoscaled)
                         \--(its vector and text)--> ShardSearcher_0 .. ShardSearcher_{n-1} (in parallel)
                         <-- fused top-k, each product with its predicted grade tier and the retrievers that found it

Each shard answers both halves of a query in one call (its dense and its
lexical top-k, every candidate with both scores); the ingress ranks them by
the request's `retrieval` (dense, lexical or hybrid: the weighted fusion the
`index` stage calibrated) and grades them with that mode's thresholds.
`GET /` is a search page for people (mr_ray/serve/page.html).

With `colocate: true` the ingress replica holds the encoder and every shard
itself (same batching, no calls between replicas): on a small node each call
between Serve replicas costs more CPU and latency than encoding a query.

`build_app(args)` is the application builder named in `serve_configs/*.yaml`
(`serve run serve_configs/local.yaml`); `serve_run(run_dir)` starts the same
app on a run folder from Python or the CLI.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from pydantic import Field, ValidationError
from ray import serve
from ray.exceptions import ActorDiedError, RayError
from ray.serve import metrics
from ray.serve.exceptions import RayServeException
from typing_extensions import Annotated

from mr_ray.cluster import init_ray
from mr_ray.config import ServeConfig
from mr_ray.grades import GRADE_NAMES, Grade
from mr_ray.retriever.encoder import encode_queries, load_encoder
from mr_ray.search.fusion import Candidates
from mr_ray.search.shards import (
    ShardIndex,
    index_encoder_path,
    merge_candidates,
    open_shards,
    read_index_manifest,
    search_shards_both,
)
from mr_ray.search.thresholds import GradeThresholds, load_retrieval_thresholds
from mr_ray.serve.api import SearchRequest, SearchResponse
from mr_ray.serve.batching import WhileBusyBatcher

logger = logging.getLogger("ray.serve")
APP_NAME = "search"
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the mr_ray package
SEARCH_PAGE = Path(__file__).with_name("page.html")


class ServeArgs(ServeConfig):
    """The app builder's args: the index folder plus the serve options."""

    index_dir: str = Field(description="an index folder (the `index` stage output): absolute, or relative to the project root")


@serve.deployment(
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16},
    max_ongoing_requests=64,
)
class QueryEncoder:
    """Encodes lists of query texts, batching the calls that queue up while a batch runs."""

    def __init__(self, model_path: str | None, device: str, max_seq_length: int, max_batch_size: int, batch_wait_timeout_s: float):
        self.model = load_encoder(model_path, device, max_seq_length)
        self.encode_batch.set_max_batch_size(max_batch_size)
        self.encode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch
    async def encode_batch(self, text_lists: list[list[str]]) -> list[np.ndarray]:
        texts = [text for texts in text_lists for text in texts]
        # In a thread, so calls keep queueing (and form the next batch) while this one encodes.
        vectors = await asyncio.to_thread(encode_queries, self.model, texts, len(texts))
        return np.split(vectors, np.cumsum([len(texts) for texts in text_lists])[:-1])

    async def __call__(self, texts: list[str]) -> np.ndarray:
        """One L2-normalised row per text."""
        return await self.encode_batch(texts)


@serve.deployment(max_ongoing_requests=64)
class ShardSearcher:
    """Holds one shard (FAISS + BM25) in memory and answers both halves of top-k searches on it."""

    def __init__(self, folder: str, search_params: str):
        self.shard = ShardIndex.open(folder, search_params)

    def search_both(self, vectors: np.ndarray, texts: list[str], k: int) -> list[Candidates]:
        return self.shard.search_both(vectors, texts, k)


api = FastAPI(
    title="mr-ray search",
    description="Graded-relevance product search, dense, lexical or hybrid: top-k products with a predicted grade tier "
    "(2 exact, 1 partial, 0 irrelevant) and the retrievers that found them. A search page is at /.",
)


@api.exception_handler(RequestValidationError)
async def readable_validation_error(request: Request, err: RequestValidationError) -> Response:
    """One readable line per problem ("k: Input should be a valid integer"), plus FastAPI's details."""
    problems = []
    for error in err.errors():
        field = ".".join(str(p) for p in error["loc"][1:]) or str(error["loc"][0])
        message = "unknown field" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")
        problems.append(f"{field}: {message}")
    body = {"detail": "; ".join(problems), "errors": jsonable_encoder(err.errors())}
    # ASCII JSON: the input echoed back may hold a lone surrogate, which has no UTF-8 (JSONResponse would fail with a 500).
    return Response(json.dumps(body), status_code=422, media_type="application/json")


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(api)
class SearchIngress:
    """Encodes the query once, asks every shard for both halves in parallel, ranks the candidates by the request's retrieval.

    Requests that queue while a retrieval runs are retrieved together in the
    next one (WhileBusyBatcher): one encoder call and one call per shard per
    batch, not per request, so under load the encoder works on batches (at
    concurrency 32 on the dev box: 2.1-2.9x the single-process server's q/s).
    `encoder` and `shards` are deployment handles, or None and [] when the
    options colocate: then this replica loads the encoder and the shards of
    `index_dir` itself.
    """

    def __init__(self, index_dir: str, encoder, shards: list, thresholds: dict, fusion_weight: float, info: dict, options: dict):
        self.options = ServeConfig(**options)
        manifest = read_index_manifest(index_dir)
        self.shard_names = [shard["name"] for shard in manifest["shards"]]
        self.encoder, self.shards = encoder, shards
        self.model, self.local_shards = None, []
        if self.options.colocate:
            model_path = index_encoder_path(index_dir, manifest)
            self.model = load_encoder(model_path, self.options.encoder_device, manifest["encoder"]["max_seq_length"])
            self.local_shards = open_shards(index_dir)
        self.thresholds = {mode: GradeThresholds(**values) for mode, values in thresholds.items()}
        self.fusion_weight = fusion_weight
        self.page = SEARCH_PAGE.read_text()
        self.info = info
        self.batcher = WhileBusyBatcher(self.retrieve, self.options.ingress_max_batch_size)
        # Exported with Serve's own Prometheus metrics (deployment, replica, app tags added by Serve).
        self.missing_shard_counter = metrics.Counter(
            "mr_ray_missing_shard_answers", description="searches answered without a shard", tag_keys=("shard",)
        )
        self.results_counter = metrics.Counter(
            "mr_ray_results_by_grade", description="returned products per predicted grade tier", tag_keys=("grade",)
        )
        self.batch_histogram = metrics.Histogram(
            "mr_ray_retrieval_batch_size", description="requests retrieved together", boundaries=[1, 2, 4, 8, 16, 32, 64]
        )

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def search_page(self) -> str:
        return self.page

    @api.get("/healthz")
    async def healthz(self) -> dict:
        thresholds = {mode: {"exact": t.exact, "partial": t.partial} for mode, t in self.thresholds.items()}
        return {"status": "ok", **self.info, "retrieval": self.options.retrieval, "fusion_weight": self.fusion_weight,
                "thresholds": thresholds["dense"], "thresholds_by_retrieval": thresholds}

    @api.get("/search", response_model=SearchResponse)
    async def search_get(self, request: Annotated[SearchRequest, Query()]) -> dict:
        return await self.search(request)

    @api.post("/search", response_model=SearchResponse)
    async def search_post(self, request: SearchRequest) -> dict:
        return await self.search(request)

    async def search(self, request: SearchRequest) -> dict:
        started = time.perf_counter()
        retrieval = request.retrieval or self.options.retrieval
        k = self.options.default_k if request.k is None else request.k
        if not 1 <= k <= self.options.max_k:
            raise HTTPException(422, f"k: {k} is out of range; 1 <= k <= {self.options.max_k}")
        if len(request.query) > self.options.max_query_chars:
            raise HTTPException(
                422, f"query: {len(request.query)} characters is too long; at most {self.options.max_query_chars}"
            )
        candidates, missing = await self.batcher(request.query)
        results = candidates.ranked(retrieval, self.fusion_weight, k)
        grades = self.thresholds[retrieval].grade([row["score"] for row in results])
        products = [
            {**row, "grade": int(grade), "grade_name": GRADE_NAMES[Grade(int(grade))]}
            for row, grade in zip(results, grades)
            if request.min_grade is None or grade >= request.min_grade
        ]
        for name, count in Counter(product["grade_name"] for product in products).items():
            self.results_counter.inc(count, tags={"grade": name})
        return {
            "query": request.query, "k": k, "retrieval": retrieval, "took_ms": round((time.perf_counter() - started) * 1000, 2),
            "results": products, "missing_shards": missing, "shards": len(self.shard_names),
        }

    async def retrieve(self, queries: list[str]) -> list[tuple[Candidates, list[str]]]:
        """Per query: its dense and lexical candidates (top max_k of each side) from the shards that answered, and the names of those that did not.

        Always the largest k the service allows, so requests with any k and any retrieval share one batch.
        """
        self.batch_histogram.observe(len(queries))
        if self.model is not None:
            # One worker thread (torch, FAISS and BM25 release the GIL), so the next batch queues up meanwhile.
            merged, missing = await asyncio.to_thread(self.search_here, queries, self.options.max_k), []
        else:
            merged, missing = await self.search_replicas(queries, self.options.max_k)
        return [(candidates, missing) for candidates in merged]

    def search_here(self, queries: list[str], k: int) -> list[Candidates]:
        """Colocated: encode and search every shard in this replica."""
        vectors = encode_queries(self.model, queries, len(queries))
        return search_shards_both(self.local_shards, vectors, queries, k)

    async def search_replicas(self, queries: list[str], k: int) -> tuple[list[Candidates], list[str]]:
        """The QueryEncoder, then every ShardSearcher in parallel: the merged candidates and the shards that did not answer."""
        for attempt in range(2):
            try:
                vectors = await self.encoder.remote(queries)
                break
            except (RayError, RayServeException) as err:
                logger.warning("query encoder attempt %d failed: %r", attempt + 1, err)
                # A replica that died mid-call (bench/serve_soak.py kills one): once more, and Serve
                # routes it to a live or the replacement replica; any other failure is answered now.
                if attempt or not isinstance(err, ActorDiedError):
                    raise HTTPException(503, "the query encoder is unavailable; retry shortly") from None
        answers = await asyncio.gather(*(self.search_shard(shard, vectors, queries, k) for shard in range(len(self.shards))))
        missing = [name for name, hits in zip(self.shard_names, answers) if hits is None]
        for name in missing:
            self.missing_shard_counter.inc(len(queries), tags={"shard": name})
        found = [hits for hits in answers if hits is not None]
        if not found:
            raise HTTPException(503, f"no shard answered ({', '.join(missing)}); retry shortly")
        return merge_candidates(found), missing

    async def search_shard(self, shard: int, vectors: np.ndarray, queries: list[str], k: int) -> list[Candidates] | None:
        """A shard's candidates per query, or None once every attempt failed (the responses then name the shard)."""
        for attempt in range(1 + self.options.shard_retries):
            try:
                return await asyncio.wait_for(self.shards[shard].search_both.remote(vectors, queries, k), self.options.shard_timeout_s)
            except (RayError, RayServeException, TimeoutError) as err:
                logger.warning("%s attempt %d failed: %r", self.shard_names[shard], attempt + 1, err)
        return None


def build_app(args: dict):
    """Serve application builder: `import_path: mr_ray.serve.app:build_app` with `args` (see ServeArgs)."""
    try:
        options = ServeArgs.model_validate(args)
    except ValidationError as err:
        lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ValueError("invalid search app args\n  " + "\n  ".join(lines)) from None
    index_dir = Path(options.index_dir)
    if not index_dir.is_absolute():
        # `serve run config.yaml` builds the app in a Ray worker whose working folder
        # is not the caller's: relative paths are taken from the project root.
        index_dir = PROJECT_ROOT / index_dir
    manifest = read_index_manifest(index_dir)
    thresholds, fusion_weight = load_retrieval_thresholds(index_dir)
    if fusion_weight is None:
        raise ValueError(f"{index_dir}: built before lexical shards existed (no fusion weight in thresholds.json); rebuild it with the `index` stage")
    info = {
        "index_dir": str(index_dir),
        "products": manifest["products"],
        "factory": manifest["factory"],
        "encoder": manifest["encoder"]["source"],
        "shards": len(manifest["shards"]),
        "colocated": options.colocate,
    }
    ingress_resources = {"num_cpus": options.ingress_num_cpus}
    if options.colocate:
        # The ingress replica does the encoder's and the shards' work: it takes their resources.
        ingress_resources = {
            "num_cpus": options.ingress_num_cpus + options.encoder_num_cpus + options.shard_num_cpus * len(manifest["shards"]),
            "num_gpus": options.encoder_num_gpus,
        }
        encoder, shards = None, []
    else:
        encoder = QueryEncoder.options(
            ray_actor_options={"num_cpus": options.encoder_num_cpus, "num_gpus": options.encoder_num_gpus},
            max_ongoing_requests=options.max_ongoing_requests,
        ).bind(
            index_encoder_path(index_dir, manifest),
            options.encoder_device,
            manifest["encoder"]["max_seq_length"],
            options.encoder_max_batch_size,
            options.encoder_batch_wait_timeout_s,
        )
        shards = [
            ShardSearcher.options(
                name=f"ShardSearcher_{number}",
                num_replicas=options.shard_replicas,
                ray_actor_options={"num_cpus": options.shard_num_cpus},
                max_ongoing_requests=options.max_ongoing_requests,
            ).bind(str(index_dir / shard["path"]), manifest["search_params"])
            for number, shard in enumerate(manifest["shards"])
        ]
    return SearchIngress.options(ray_actor_options=ingress_resources, max_ongoing_requests=options.max_ongoing_requests).bind(
        str(index_dir), encoder, shards, {mode: t.__dict__ for mode, t in thresholds.items()}, fusion_weight, info,
        options.model_dump(exclude={"index_dir"}),
    )


def serve_run(
    run_dir: str | Path,
    config: ServeConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    blocking: bool = True,
):
    """Serve the index of a finished run (`run_dir/index`) over HTTP; the hook behind `mr-ray serve`.

    Connects to the Ray cluster in RAY_ADDRESS if set, else starts a local one.
    Returns the ingress handle when `blocking` is False.
    """
    index_dir = Path(run_dir).resolve() / "index"
    read_index_manifest(index_dir)  # fail before starting anything when the run has no index
    init_ray(serving=True)
    serve.start(http_options={"host": host, "port": port})
    args = {"index_dir": str(index_dir), **(config or ServeConfig()).model_dump()}
    return serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=blocking)
