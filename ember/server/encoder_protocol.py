"""Request and response bodies of the encoder routes: OpenAI's /v1/embeddings, and TEI's /rerank and
/predict (the shapes Baseten's BEI and the Performance Client use). Unknown fields are accepted and ignored."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ember.server.protocol import NonNegInt

MAX_INPUTS = 2048  # inputs per request (OpenAI's limit for /v1/embeddings)


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Truncation(_Request):
    truncate: bool = False  # cut inputs longer than the model's limit; false: such inputs are a 400
    truncation_direction: Literal["Right", "Left", "right", "left"] = "Right"

    @property
    def cuts_left(self) -> bool:
        return self.truncation_direction.lower() == "left"


EmbeddingInput = str | list[str] | list[NonNegInt] | list[list[NonNegInt]]


class EmbeddingRequest(_Truncation):
    input: EmbeddingInput
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class RerankRequest(_Truncation):
    query: str
    texts: list[str] = Field(..., min_length=1, max_length=MAX_INPUTS)
    model: str | None = None
    raw_scores: bool = False  # the logit; false: sigmoid(logit)
    return_text: bool = False


class PredictRequest(_Truncation):
    # one text, a batch of texts, or a batch of [text] / [text, text_pair] lists
    inputs: str | list[str] | list[list[str]]
    model: str | None = None
    raw_scores: bool = False  # logits; false: softmax (sigmoid for a single label)

    @field_validator("inputs")
    @classmethod
    def _pairs(cls, v):
        if isinstance(v, list) and len(v) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs per request")
        if isinstance(v, list) and any(isinstance(x, list) and not 1 <= len(x) <= 2 for x in v):
            raise ValueError("each input list must hold one text or a [text, text_pair]")
        return v


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbeddingUsage(_Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingData(_Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingResponse(_Response):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class RerankResult(_Response):
    index: int
    score: float
    text: str | None = None


class Prediction(_Response):
    label: str
    score: float
