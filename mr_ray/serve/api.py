"""The HTTP contract of the search service: request and response models.

Limits that come from the service's config (the largest k, the longest query)
are checked by the ingress, which knows them; everything else is checked here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mr_ray.grades import Grade


class SearchRequest(BaseModel):
    """Query parameters of GET /search and the JSON body of POST /search."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(description="the shopper's query text")
    k: int | None = Field(None, description="how many products to return (default and maximum set by the service)")
    min_grade: Grade | None = Field(
        None, description="drop products predicted below this grade: 2 = exact only, 1 = exact and substitutes/complements"
    )
    retrieval: Literal["dense", "lexical", "hybrid"] | None = Field(
        None, description="dense (FAISS), lexical (BM25) or hybrid (their weighted fusion); default set by the service"
    )

    @field_validator("query")
    @classmethod
    def not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("query is empty")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate ("\ud800"), which JSON can carry and no tokenizer takes
            raise ValueError(f"query is not valid Unicode text (character {err.start + 1} is a lone surrogate)") from None
        return value

    @field_validator("k", mode="before")
    @classmethod
    def not_a_bool(cls, value):
        if isinstance(value, bool):  # JSON true would otherwise pass as k=1
            raise ValueError(f"expected a whole number, got {str(value).lower()}")
        return value


class Product(BaseModel):
    product_id: str
    title: str
    score: float = Field(
        description="the ranking score of the request's retrieval: cosine (dense), BM25 over the query's best BM25 (lexical), "
        "or their weighted fusion (hybrid)"
    )
    dense_score: float = Field(description="cosine similarity of query and product")
    lexical_score: float = Field(description="BM25 score of the product's title (0: no word in common)")
    found_by: list[Literal["dense", "lexical"]] = Field(description="the retrievers whose top-k held the product")
    grade: Grade = Field(description="predicted grade tier from the score thresholds calibrated for this retrieval")
    grade_name: str


class SearchResponse(BaseModel):
    query: str
    k: int
    retrieval: Literal["dense", "lexical", "hybrid"]
    took_ms: float = Field(description="time the service spent on the request")
    results: list[Product]
    missing_shards: list[str] = Field(description="shards that did not answer; the results come from the others")
    shards: int
