"""LLM: the synchronous Python API (DESIGN 1.4). Batches every prompt through one continuous-batching
engine and returns the finished outputs in prompt order."""

from __future__ import annotations

import itertools

from tqdm import tqdm

from ember.engine.llm_engine import LLMEngine
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        return [prompts]  # one prompt given as token ids
    return prompts


class LLM:
    """`LLM(source, **overrides)`: source is a YAML config, a model dir, a .gguf, an engine dir, an
    EngineConfig, or None for the default model; keyword arguments override config fields."""

    def __init__(self, source=None, **overrides):
        from ember.build.engine_cache import resolve_engine
        from ember.config import EngineConfig, load_config

        cfg = source if isinstance(source, EngineConfig) and not overrides else load_config(source, **overrides)
        cfg = resolve_engine(cfg)  # a quantization_type: build the engine once into the engine cache, serve it
        self.config = cfg
        self.engine = LLMEngine(cfg)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()
        self._renderer = None  # the chat template, compiled on first use

    @property
    def chat_template(self) -> str | None:
        return self.engine.setup.chat_template

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False, lora_name: str | list[str | None] | None = None) -> list[RequestOutput]:
        """lora_name: the LoRA adapter for every prompt, or one per prompt (None: the base model).
        sampling_params None: the model's sampling defaults (its generation_config.json under ember.sampling_defaults)."""
        prompts = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams(**self.engine.core.info().sampling_defaults)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        loras = lora_name if isinstance(lora_name, list) else [lora_name] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError(f"got {len(loras)} lora names for {len(prompts)} prompts")
        order = {}
        for prompt, p, lora in zip(prompts, params, loras):
            rid = f"llm-{next(self._ids)}"
            order[rid] = len(order)
            self.engine.add_request(rid, prompt, p, lora_name=lora)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(prompts), desc="generating", disable=not use_tqdm)
        while len(results) < len(order):
            for out in self.engine.step():
                if out.finished and out.request_id in order:
                    results[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [results[rid] for rid in sorted(results, key=order.__getitem__)]

    def chat(self, messages, sampling_params: SamplingParams | None = None, *, tools=None,
             add_generation_prompt: bool = True, use_tqdm: bool = False) -> list[RequestOutput]:
        """`messages`: one conversation (a list of {role, content}) or a list of conversations."""
        from ember.server.chat import ChatRenderer
        from ember.server.protocol import ChatMessage

        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if self._renderer is None:
            self._renderer = ChatRenderer(self.tokenizer, self.chat_template)
        prompts = [self._renderer.render([ChatMessage.model_validate(m) for m in conv], tools=tools,
                                         add_generation_prompt=add_generation_prompt) for conv in convs]
        token_prompts = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        return self.generate(token_prompts, sampling_params, use_tqdm=use_tqdm)
