"""A realistic stand-in for AsyncLLM: a real byte-level tokenizer built offline, cumulative
RequestOutputs one token at a time, n sequences, max_tokens, stop strings, EOS, logprobs, held-back
partial UTF-8, and knobs for queue-full, dead engine, a failure mid-stream and a stream that hangs
until released (for disconnect, timeout and drain tests)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from types import SimpleNamespace

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ember.errors import ContextLengthExceededError, EngineDeadError, QueueFullError
from ember.outputs import CompletionOutput, RequestOutput, TokenLogprob

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'tool' %}{{ '<|im_start|>tool\n' + m['content'] | trim + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] | trim + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: every text round-trips, one token per byte."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return fast


@dataclass
class FakeStats:
    num_running: int = 1
    num_waiting: int = 2
    kv_cache_usage: float = 0.25
    prefix_cache_queries: int = 100
    prefix_cache_hits: int = 40
    prompt_tokens_total: int = 1234
    generation_tokens_total: int = 567
    num_draft_tokens_total: int = 10
    num_accepted_tokens_total: int = 7


class FakeEngine:
    def __init__(self, tokenizer, chat_template: str | None = CHAT_TEMPLATE, max_model_len: int = 512):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.served_model_name = "fake-model"
        self.lora_names = ["fake-lora"]
        self.max_model_len = max_model_len
        self.reply = "Hello! I am a fake model, café."  # "é" is two byte tokens: tests held-back UTF-8
        self.healthy = True
        self.queue_full = False
        self.fail_after: int | None = None  # raise after this many outputs
        self.hang_after: int | None = None  # after this many outputs wait for release() (or cancellation)
        self.calls: list[SimpleNamespace] = []
        self.aborted: list[str] = []
        self.abort_event = threading.Event()
        self.hanging = threading.Event()  # set once a request hangs
        self.closed_unfinished: list[str] = []  # generators closed before finishing
        self.started = self.shut_down = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def start(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        self.shut_down = True

    def is_healthy(self) -> bool:
        return self.healthy

    def stats(self) -> FakeStats:
        return FakeStats()

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.abort_event.set()

    def release(self) -> None:
        """Let hanging requests go on (thread-safe)."""
        self.hang_after = None
        for loop, event in self._waiters:
            loop.call_soon_threadsafe(event.set)

    def reply_for(self, index: int) -> str:
        return self.reply if index == 0 else f"[{index}] {self.reply}"

    async def generate(self, prompt, params, request_id, *, lora_name=None, deadline=None):
        self.calls.append(SimpleNamespace(prompt=prompt, params=params, request_id=request_id, lora_name=lora_name, deadline=deadline))
        if not self.healthy:
            raise EngineDeadError("The engine loop died.")
        if self.queue_full:
            raise QueueFullError("The waiting queue is full (4 requests).", retry_after=2.5)
        prompt_ids = list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt)
        if len(prompt_ids) + (params.max_tokens or 0) > self.max_model_len:
            raise ContextLengthExceededError("too long (engine check)")
        replies = [self.tokenizer.encode(self.reply_for(i), add_special_tokens=False) for i in range(params.n)]
        seqs = [CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None) for i in range(params.n)]
        is_finished = False
        try:
            step = 0
            while True:
                if self.fail_after is not None and step >= self.fail_after:
                    raise RuntimeError("boom: /secret/internal/path.py line 42")
                if self.hang_after is not None and step >= self.hang_after:
                    await self._hang()
                for seq in seqs:
                    if not seq.finished:
                        self._advance(seq, replies[seq.index], params)
                step += 1
                is_finished = all(s.finished for s in seqs)
                outs = [CompletionOutput(s.index, s.text, list(s.token_ids), s.finish_reason, s.stop_reason, _copy(s.logprobs)) for s in seqs]
                yield RequestOutput(request_id, None, prompt_ids, outs, finished=is_finished, num_cached_tokens=3)
                if is_finished:
                    return
                await asyncio.sleep(0)  # let other requests run, as the engine loop would
        finally:
            if not is_finished:
                self.closed_unfinished.append(request_id)

    async def _hang(self) -> None:
        event = asyncio.Event()
        self._waiters.append((asyncio.get_running_loop(), event))
        self.hanging.set()
        await event.wait()

    def _advance(self, seq: CompletionOutput, reply: list[int], params) -> None:
        pos = len(seq.token_ids)
        if pos >= len(reply) and not params.ignore_eos:
            seq.finish_reason, seq.stop_reason = "stop", self.tokenizer.eos_token_id
            return
        token = reply[pos % len(reply)]
        seq.token_ids.append(token)
        if seq.logprobs is not None:
            top = [(token, -0.25)] + [((token + j) % 256, -1.0 - j) for j in range(1, params.logprobs)]
            seq.logprobs.append(TokenLogprob(token, -0.25, top[: params.logprobs]))
        text = self.tokenizer.decode(seq.token_ids)
        seq.text = text.rstrip("\ufffd")  # hold back an incomplete UTF-8 character
        for stop in params.stop:
            at = text.find(stop)
            if at >= 0:
                seq.text = text[: at + len(stop)] if params.include_stop_str_in_output else text[:at]
                seq.finish_reason, seq.stop_reason = "stop", stop
                return
        if params.max_tokens is not None and len(seq.token_ids) >= params.max_tokens:
            seq.text = text
            seq.finish_reason = "length"


def _copy(logprobs):
    return None if logprobs is None else list(logprobs)
