"""OutputProcessor: the front end's half of a step. Folds the core's per-sequence deltas into the user's
cumulative RequestOutputs (one live CompletionOutput per sequence, appended to in place), detokenizes,
matches stop strings and groups the n sequences of a request.

A step costs the new tokens only: no list is copied, text is appended as pieces. A matched stop string
finishes the sequence here; the caller then aborts it in the core (`ProcessedOutputs.abort_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ember.engine.detokenizer import Detokenizer, DetokenizerState
from ember.engine.messages import EngineCoreOutput
from ember.engine.processor import seq_ids
from ember.outputs import CompletionOutput, RequestMetrics, RequestOutput
from ember.sampling_params import SamplingParams


@dataclass
class SeqState:
    """One sequence: its live output and its detokenizer."""

    request: "RequestState"
    completion: CompletionOutput
    detok: DetokenizerState
    eos_token_ids: set[int]


@dataclass
class RequestState:
    """One user request and its n sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[SeqState] = field(default_factory=list)
    num_unfinished: int = 0
    prompt_logprobs: list | None = None  # [None, then TokenLogprob per prompt token] (prompt_logprobs asked)

    def output(self) -> RequestOutput:
        comps = [s.completion for s in self.seqs]  # the live objects: n references, no copies
        cached = max(c.metrics.num_cached_tokens for c in comps)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, comps, self.num_unfinished == 0, cached,
                             self.prompt_logprobs)


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput]  # one per request touched this step
    abort_ids: list[str]  # sequences a stop string finished: abort them in the core


class OutputProcessor:
    def __init__(self, tokenizer):
        self.detokenizer = Detokenizer(tokenizer)
        self.requests: dict[str, RequestState] = {}  # user request id -> state
        self.seqs: dict[str, SeqState] = {}  # core sequence id -> state

    def add_request(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
                    eos_token_ids: set[int], arrival: float) -> None:
        state = RequestState(request_id, prompt, prompt_ids, params, num_unfinished=params.n,
                             prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
        for i, sid in enumerate(seq_ids(request_id, params.n)):
            comp = CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None,
                                    metrics=RequestMetrics(arrival_time=arrival))
            detok = self.detokenizer.new_state(prompt_ids, params.stop, params.include_stop_str_in_output,
                                               params.skip_special_tokens)
            seq = SeqState(state, comp, detok, eos_token_ids)
            state.seqs.append(seq)
            self.seqs[sid] = seq
        self.requests[request_id] = state

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def process(self, outputs: list[EngineCoreOutput], now: float) -> ProcessedOutputs:
        touched: dict[str, RequestState] = {}
        abort_ids = []
        for out in outputs:
            seq = self.seqs.get(out.request_id)
            if seq is None:
                continue  # aborted by the front end while the step ran
            if self._apply(seq, out, now):
                abort_ids.append(out.request_id)
            touched[seq.request.request_id] = seq.request
        results = []
        for state in touched.values():
            results.append(state.output())
            if state.num_unfinished == 0:
                self._forget(state)
        return ProcessedOutputs(results, abort_ids)

    def abort_request(self, request_id: str) -> tuple[RequestOutput | None, list[str]]:
        """Finish a request's running sequences as aborted: (its final output, the sequence ids to abort)."""
        state = self.requests.get(request_id)
        if state is None:
            return None, []
        ids = [sid for sid, seq in zip(seq_ids(request_id, state.params.n), state.seqs) if not seq.completion.finished]
        for seq in state.seqs:
            if not seq.completion.finished:
                self._finish(seq, "abort", None)
        self._forget(state)
        return state.output(), ids

    # ---- one sequence ---------------------------------------------------------------------------
    def _apply(self, seq: SeqState, out: EngineCoreOutput, now: float) -> bool:
        """Fold one delta in; True when a stop string finished the sequence (the core must abort it)."""
        comp, m = seq.completion, seq.completion.metrics
        if comp.finished:
            return False
        m.num_steps += 1
        if m.first_scheduled_time is None:  # when its first step began, not when that step's output arrived
            m.first_scheduled_time = out.step_start_time if out.step_start_time is not None else now
            m.num_cached_tokens = out.num_cached_tokens
        m.num_draft_tokens += out.num_draft_tokens
        m.num_accepted_tokens += out.num_accepted_tokens
        if out.new_prompt_logprobs and seq.completion.index == 0:  # n sequences share one prompt: the first's
            seq.request.prompt_logprobs.extend(out.new_prompt_logprobs)
        new_ids = out.new_token_ids
        stop_hit = False
        if new_ids:
            m.num_decode_steps += 1
            if m.first_token_time is None:
                m.first_token_time = now
            comp.token_ids.extend(new_ids)
            if comp.logprobs is not None and out.new_logprobs:
                comp.logprobs.extend(out.new_logprobs)
            skip = seq.request.params.skip_special_tokens
            text_ids = [t for t in new_ids if t not in seq.eos_token_ids] if skip else new_ids
            stop_hit = self.detokenizer.append(seq.detok, text_ids)
            comp.append_text(self.detokenizer.take(seq.detok))
        if stop_hit:
            self._finish(seq, "stop", seq.detok.stop_reason, now)
            return out.finish_reason is None  # the core may have finished it in the same step
        if out.finish_reason is not None:
            stop_reason = out.stop_reason
            if out.finish_reason == "stop" and stop_reason is None and comp.token_ids:
                stop_reason = comp.token_ids[-1]  # eos: the token that ended it
            self._finish(seq, out.finish_reason, stop_reason, now)
        return False

    def _finish(self, seq: SeqState, reason: str, stop_reason, now: float | None = None) -> None:
        comp = seq.completion
        if reason != "abort" and seq.detok.stop_reason is None:
            self.detokenizer.finish(seq.detok)  # release held-back text: no stop string can complete now
            comp.append_text(self.detokenizer.take(seq.detok))
        comp.finish_reason, comp.stop_reason = reason, stop_reason
        if now is not None:
            comp.metrics.finished_time = now
        seq.request.num_unfinished -= 1

    def _forget(self, state: RequestState) -> None:
        self.requests.pop(state.request_id, None)
        for sid in seq_ids(state.request_id, state.params.n):
            self.seqs.pop(sid, None)
