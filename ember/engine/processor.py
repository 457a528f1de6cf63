"""InputProcessor: the front end's half of admission. Tokenizes a prompt, checks it against the model
(vocabulary, context length, served adapters) and turns one user request into its n EngineCoreRequests.
Runs on the caller's side (the API server's event loop, or `LLM`), never inside the engine core."""

from __future__ import annotations

import time

from ember.engine.messages import EngineCoreRequest, EngineInfo
from ember.errors import ContextLengthExceededError, InvalidRequestError, ModelNotFoundError
from ember.sampling_params import SamplingParams


def seq_ids(request_id: str, n: int) -> list[str]:
    """The core's ids of a request's sequences (the request id itself when n == 1)."""
    return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]


class InputProcessor:
    def __init__(self, tokenizer, info: EngineInfo):
        self.tokenizer = tokenizer
        self.info = info  # limits learnt from the core at start-up; lora_names kept current by the caller

    def process(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                arrival_time: float | None = None, cache_salt: str | None = None,
                lora_name: str | None = None) -> tuple[str | None, list[int], list[EngineCoreRequest]]:
        """(prompt text or None, prompt ids, one EngineCoreRequest per sequence); raises a 400/404 EmberError."""
        info = self.info
        if lora_name is not None:
            if lora_name not in info.lora_names:
                raise ModelNotFoundError(f"LoRA adapter {lora_name!r} is not served here; served adapters: "
                                         f"{', '.join(info.lora_names) or 'none'}", param="model")
            # the adapter changes every layer's K/V: prefix blocks are never shared across adapters
            cache_salt = f"lora:{lora_name}" if cache_salt is None else f"lora:{lora_name}:{cache_salt}"
        if isinstance(prompt, str):
            prompt_text, prompt_ids = prompt, list(self.tokenizer.encode(prompt))
        else:
            prompt_text, prompt_ids = None, [int(t) for t in prompt]
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty; give at least one token", param="prompt")
        vocab = info.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
        bad = next((t for t in params.logit_bias or () if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"logit_bias token id {bad} is outside the vocabulary [0, {vocab})",
                                      param="logit_bias")
        max_tokens = self._max_tokens(len(prompt_ids), params)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        eos = set() if params.ignore_eos else set(info.eos_token_ids)
        reqs = []
        for i, sid in enumerate(seq_ids(request_id, params.n)):
            seq_params = params if params.seed is None or i == 0 else params.clone(seed=params.seed + i)
            reqs.append(EngineCoreRequest(sid, prompt_ids, seq_params, eos, max_tokens, arrival, cache_salt, lora_name))
        return prompt_text, prompt_ids, reqs

    def _max_tokens(self, num_prompt: int, params: SamplingParams) -> int:
        max_model_len = self.info.max_model_len
        room = max_model_len - num_prompt
        if params.max_tokens is None:
            if room < 1:
                raise ContextLengthExceededError(
                    f"the prompt has {num_prompt} tokens, which leaves no room in the model's context of "
                    f"{max_model_len} tokens", param="messages")
            return room
        if num_prompt + params.max_tokens > max_model_len:
            raise ContextLengthExceededError(
                f"this model's maximum context length is {max_model_len} tokens, but the request asks "
                f"for {num_prompt + params.max_tokens} ({num_prompt} in the prompt, {params.max_tokens} to generate); "
                f"reduce the prompt or max_tokens", param="max_tokens")
        return params.max_tokens
