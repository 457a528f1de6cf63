"""Per-request sampling settings: the OpenAI sampling fields plus top_k, min_p, repetition_penalty,
ignore_eos and stop_token_ids. Plain data, torch-free; validated once at construction so that the
engine never sees an impossible value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ember.structured.spec import StructuredOutputSpec

MAX_LOGPROBS = 20  # OpenAI's top_logprobs ceiling


@dataclass
class SamplingParams:
    n: int = 1  # completions per prompt
    max_tokens: int | None = 16  # None: up to the context limit
    min_tokens: int = 0  # EOS / stop tokens are masked until this many tokens exist
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # 0 means greedy (OpenAI's range is [0, 1]; nothing but the top token is left)
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1.0: off (HF/CTRL style, over prompt and output)
    seed: int | None = None  # same seed, same output, whatever else is in the batch
    stop: list[str] = field(default_factory=list)  # matched on detokenized text, never returned
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: sampled token's logprob plus top k
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling, in [-100, 100]
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Speculation overrides (None: the engine's build.speculator value; at most that value; 0 turns
    # the Jacobi window / the verification n-grams off). Outputs are the same either way.
    lookahead_windows_size: int | None = None  # W
    lookahead_ngram_size: int | None = None  # N
    lookahead_verification_set_size: int | None = None  # G
    enable_b10_lookahead: bool | None = None  # False: no prompt lookup for this request
    structured: "StructuredOutputSpec | None" = None  # grammar constraint (JSON schema, regex, EBNF, choice)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        if self.top_p == 0.0:
            self.temperature, self.top_p = 0.0, 1.0
        _check(self.n >= 1, "n", self.n, "must be at least 1")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", self.max_tokens, "must be at least 1")
        _check(self.min_tokens >= 0, "min_tokens", self.min_tokens, "must be non-negative")
        _check(self.temperature >= 0.0, "temperature", self.temperature, "must be non-negative")
        _check(0.0 <= self.top_p <= 1.0, "top_p", self.top_p, "must be in [0, 1]")
        _check(self.top_k == -1 or self.top_k >= 1, "top_k", self.top_k, "must be -1 (off) or at least 1")
        _check(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "must be in [0, 1]")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", self.presence_penalty, "must be in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", self.frequency_penalty, "must be in [-2, 2]")
        _check(self.repetition_penalty > 0.0, "repetition_penalty", self.repetition_penalty, "must be positive")
        for name in ("lookahead_windows_size", "lookahead_ngram_size", "lookahead_verification_set_size"):
            v = getattr(self, name)
            _check(v is None or v >= 0, name, v, "must be non-negative")
        if self.logit_bias:
            self.logit_bias = {_token_id(k): float(v) for k, v in self.logit_bias.items()}
            for k, v in self.logit_bias.items():
                _check(-100.0 <= v <= 100.0, "logit_bias", {k: v}, "values must be in [-100, 100]")
        else:
            self.logit_bias = None
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            _check(v is None or 0 <= v <= MAX_LOGPROBS, name, v, f"must be between 0 and {MAX_LOGPROBS}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def clone(self, **changes) -> "SamplingParams":
        kw = {f: getattr(self, f) for f in self.__dataclass_fields__}
        kw.update(changes)
        return SamplingParams(**kw)


def _token_id(key) -> int:
    """A logit_bias key: a token id, as an int or (OpenAI's JSON) a string of one."""
    try:
        tid = int(key)
    except (TypeError, ValueError):
        raise ValueError(f"logit_bias={{{key!r}: ...}} keys must be token ids (integers)") from None
    if isinstance(key, float) or isinstance(key, bool) or tid < 0 or (isinstance(key, str) and key.strip() != str(tid)):
        raise ValueError(f"logit_bias={{{key!r}: ...}} keys must be non-negative integer token ids")
    return tid


def _check(ok: bool, name: str, value, what: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} {what}")
