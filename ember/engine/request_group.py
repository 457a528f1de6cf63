"""RequestGroup: one user request and its n sequences, turned into cumulative RequestOutputs."""

from __future__ import annotations

from dataclasses import dataclass

from ember.engine.detokenizer import Detokenizer, DetokenizerState
from ember.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from ember.sampling_params import SamplingParams

_FINISH_REASONS = {
    "FINISHED_STOPPED": "stop",
    "FINISHED_LENGTH": "length",
    "FINISHED_ABORTED": "abort",
}


@dataclass
class RequestGroup:
    request_id: str  # the user's id
    prompt: str | None  # prompt text when given as text
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list  # core Requests, one per completion
    states: list[DetokenizerState]  # one per seq
    completions: list[CompletionOutput]  # one per seq, cumulative
    detokenizer: Detokenizer

    @classmethod
    def create(cls, request_id, prompt, prompt_ids, params, seqs, detokenizer: Detokenizer, arrival: float):
        states = [detokenizer.new_state(prompt_ids, params.stop, params.include_stop_str_in_output,
                                        params.skip_special_tokens) for _ in seqs]
        comps = [CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None,
                                  metrics=RequestMetrics(arrival_time=arrival)) for i in range(len(seqs))]
        return cls(request_id, prompt, list(prompt_ids), params, seqs, states, comps, detokenizer)

    def _index(self, seq) -> int:
        for i, s in enumerate(self.seqs):
            if s is seq or s.request_id == seq.request_id:
                return i
        raise KeyError(seq.request_id)

    def on_step(self, seq, new_ids: list[int], logprobs: list[TokenLogprob] | None, now: float) -> bool:
        """Record a step of `seq`; returns True when a stop string matched."""
        i = self._index(seq)
        comp, state = self.completions[i], self.states[i]
        m = comp.metrics
        m.num_steps += 1
        if m.first_scheduled_time is None:
            m.first_scheduled_time = now
            m.num_cached_tokens = getattr(seq, "num_cached_tokens", 0)
        if not new_ids:
            return False
        m.num_decode_steps += 1
        if m.first_token_time is None:
            m.first_token_time = now
        comp.token_ids.extend(new_ids)
        if comp.logprobs is not None and logprobs:
            comp.logprobs.extend(logprobs)
        text_ids = [t for t in new_ids if t not in seq.eos_token_ids] if self.params.skip_special_tokens else new_ids
        stop_hit = self.detokenizer.append(state, text_ids)
        comp.text = state.output_text
        if stop_hit:
            comp.stop_reason = state.stop_reason
            comp.finish_reason = "stop"
        return stop_hit

    def num_output_tokens(self, seq) -> int:
        """Tokens of `seq` recorded so far."""
        return len(self.completions[self._index(seq)].token_ids)

    def on_spec(self, seq, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        """Record a step's speculation for `seq`: drafts verified, and how many were accepted."""
        m = self.completions[self._index(seq)].metrics
        m.num_draft_tokens += num_draft_tokens
        m.num_accepted_tokens += num_accepted_tokens

    def on_finished(self, seq, now: float) -> None:
        i = self._index(seq)
        comp, state = self.completions[i], self.states[i]
        if comp.metrics.finished_time is not None:
            return
        comp.metrics.finished_time = now
        if comp.finish_reason is None:
            comp.finish_reason = _FINISH_REASONS.get(seq.status.name, "stop")
            if comp.stop_reason is None and comp.finish_reason == "stop" and comp.token_ids:
                comp.stop_reason = comp.token_ids[-1]
        if state.stop_reason is None:
            self.detokenizer.finish(state)
        comp.text = state.output_text

    def mark_aborted(self) -> None:
        for comp, state in zip(self.completions, self.states):
            if comp.finish_reason is None:
                comp.finish_reason = "abort"
                comp.text = state.output_text

    @property
    def is_finished(self) -> bool:
        return all(c.finish_reason is not None and c.metrics.finished_time is not None for c in self.completions) \
            or all(c.finish_reason == "abort" for c in self.completions)

    def to_output(self) -> RequestOutput:
        comps = [CompletionOutput(index=c.index, text=c.text, token_ids=list(c.token_ids),
                                  finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                  logprobs=list(c.logprobs) if c.logprobs is not None else None,
                                  metrics=c.metrics)
                 for c in self.completions]
        finished = all(c.finish_reason is not None for c in comps)
        cached = max((c.metrics.num_cached_tokens for c in comps), default=0)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, comps, finished, cached)
