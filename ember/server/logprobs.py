"""Engine token logprobs (ember.outputs.TokenLogprob) in OpenAI's two formats, plus `usage`.

Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`.
Completions: parallel lists `tokens`, `token_logprobs`, `top_logprobs` (dicts), `text_offset`.
A token's text is its own decoding (`decode([id])`), as vLLM does; -inf becomes -9999.0 because
JSON has no infinity."""

from __future__ import annotations

import math

from ember.server.protocol import (
    ChatChoiceLogprobs,
    CompletionLogprobs,
    PromptLogprob,
    PromptTokensDetails,
    TokenLogprobOut,
    TopLogprob,
    Usage,
)

_MIN_LOGPROB = -9999.0
_MAX_CACHED = 200_000


def _finite(logprob: float) -> float:
    return _MIN_LOGPROB if math.isnan(logprob) or logprob < _MIN_LOGPROB else float(logprob)


class TokenTexts:
    """Decoded text of single token ids, cached (logprobs need it for every token and alternative)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            if len(self.cache) < _MAX_CACHED:
                self.cache[token_id] = text
        return text


def chat_logprobs(entries, texts: TokenTexts) -> ChatChoiceLogprobs:
    content = []
    for e in entries:
        token = texts(e.token_id)
        tops = [TopLogprob(token=texts(tid), logprob=_finite(lp), bytes=list(texts(tid).encode())) for tid, lp in e.top]
        content.append(TokenLogprobOut(token=token, logprob=_finite(e.logprob), bytes=list(token.encode()), top_logprobs=tops))
    return ChatChoiceLogprobs(content=content)


def completion_logprobs(entries, texts: TokenTexts, offset: int, prompt_ids: list[int] | None = None,
                        prompt_logprobs: list | None = None) -> tuple[CompletionLogprobs, int]:
    """Logprobs of `entries`, text offsets starting at `offset`; echoed prompt tokens (prompt_ids) come first,
    with their teacher-forced logprobs (`prompt_logprobs`: RequestOutput.prompt_logprobs, None for the first
    token). Returns the next offset."""
    out = CompletionLogprobs()
    for i, tid in enumerate(prompt_ids or []):
        token = texts(tid)
        e = prompt_logprobs[i] if prompt_logprobs is not None and i < len(prompt_logprobs) else None
        out.tokens.append(token)
        out.token_logprobs.append(None if e is None else _finite(e.logprob))
        out.top_logprobs.append(None if e is None else {texts(t): _finite(lp) for t, lp in e.top})
        out.text_offset.append(offset)
        offset += len(token)
    for e in entries:
        token = texts(e.token_id)
        out.tokens.append(token)
        out.token_logprobs.append(_finite(e.logprob))
        out.top_logprobs.append({texts(tid): _finite(lp) for tid, lp in e.top})
        out.text_offset.append(offset)
        offset += len(token)
    return out, offset


def prompt_logprobs_out(entries, texts: TokenTexts, k: int) -> list:
    """vLLM's `prompt_logprobs`: per prompt token {token id: {logprob, rank, decoded_token}} for the token itself
    and its top k alternatives (ranks 1..k); null for the first token."""
    out = []
    for e in entries or []:
        if e is None:
            out.append(None)
            continue
        d = {str(e.token_id): PromptLogprob(logprob=_finite(e.logprob), rank=e.rank, decoded_token=texts(e.token_id))}
        for r, (tid, lp) in enumerate(e.top[:k], start=1):
            d.setdefault(str(tid), PromptLogprob(logprob=_finite(lp), rank=r, decoded_token=texts(tid)))
        out.append(d)
    return out


def make_usage(num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int = 0) -> Usage:
    return Usage(
        prompt_tokens=num_prompt_tokens,
        completion_tokens=num_completion_tokens,
        total_tokens=num_prompt_tokens + num_completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=num_cached_tokens),
    )
