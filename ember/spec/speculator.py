"""The Speculator: the engine's one speculation hook, called at two named points of `LLMEngine.step()`.

`propose(running)` runs before `Scheduler.schedule()`: it picks the requests that may speculate this
step, asks the proposer for their drafts (setting `request.spec_token_ids`) and returns the step's
`SpecDecodeMetadata` (tree shapes) for the runner. `observe(sched_out, spec_outputs)` runs after
`Scheduler.update()`: it tells the proposer what was accepted and keeps the counters.

Who speculates. Only requests that decode (their next step feeds exactly their last sampled token),
whose sampling the verifier reproduces exactly (no penalties, no logprobs, past min_tokens), that are
not backing off. Back-off: after `max_misses` speculative steps in a row with nothing accepted, a
request skips speculation for a cooldown that doubles up to `max_cooldown` steps. Batch back-off:
drafts of the whole step are capped at `max_spec_tokens` minus the decoding requests, shared out
evenly (what one request leaves goes to the later ones), so large batches (where verifying costs compute that a batch-1 step leaves idle) stop
speculating. Seeded sampled requests are exempt from the batch cap, so their drafts, and hence their
tokens, never depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ember.errors import InvalidRequestError
from ember.spec.lookahead import LookaheadProposer
from ember.spec.prompt_lookup import PromptLookupProposer
from ember.spec.proposer import Draft, Proposer
from ember.spec.tree import SpecDecodeMetadata, SpecOutput

_OVERRIDES = ("lookahead_windows_size", "lookahead_ngram_size", "lookahead_verification_set_size")


@dataclass
class _Backoff:
    misses: int = 0  # speculative steps in a row with nothing accepted
    cooldown: int = 1  # steps the next back-off lasts
    skip: int = 0  # steps left to sit out


class Speculator:
    def __init__(self, proposer: Proposer, max_draft_len: int, max_spec_tokens: int,
                 maxima: dict[str, int] | None = None, max_misses: int = 3, max_cooldown: int = 16):
        self.proposer = proposer
        self.max_draft_len = max_draft_len  # drafts per request per step
        self.max_spec_tokens = max_spec_tokens  # decoding tokens + drafts per step before drafts stop
        self.maxima = maxima or {}  # per-request override name -> the engine's value (the ceiling)
        self.max_misses = max_misses
        self.max_cooldown = max_cooldown
        self._backoff: dict[str, _Backoff] = {}
        self._drafts: dict[str, Draft] = {}  # this step's drafts by request id
        self.num_draft_tokens = 0  # drafts run, all requests
        self.num_accepted_tokens = 0  # of those, accepted
        self.num_spec_steps = 0  # request-steps that verified drafts

    def check(self, params) -> None:
        """Refuse per-request overrides above the engine's configured maxima (a 400, naming the field)."""
        for name in _OVERRIDES:
            v = getattr(params, name, None)
            if v is not None and name in self.maxima and v > self.maxima[name]:
                raise InvalidRequestError(f"{name}={v} is above this engine's {name} of {self.maxima[name]}",
                                          param=name)

    def propose(self, running: list) -> SpecDecodeMetadata:
        meta = SpecDecodeMetadata()
        self._drafts = {}
        decoding = [r for r in running if r.num_computed_tokens == r.num_tokens - 1]
        for req in decoding:
            req.spec_token_ids = []  # stale drafts of a step the budget skipped
        budget = self.max_spec_tokens - len(decoding)
        num_capped = sum(not _is_seeded_sampling(r) for r in decoding)
        for req in sorted(decoding, key=lambda r: not _is_seeded_sampling(r)):  # stable: batch order kept
            exempt = _is_seeded_sampling(req)
            room = min(self.max_draft_len, req.max_tokens - req.num_output_tokens - 1)
            if not exempt:
                room = min(room, budget // max(1, num_capped))  # a fair share; what one leaves, later ones get
                num_capped -= 1
            if room <= 0 or not self._may_speculate(req):
                continue
            draft = self.proposer.propose(req, room)
            draft = draft.truncated(room) if draft else None
            if draft and getattr(req, "matcher", None) is not None:
                draft = draft.chain_prefix()  # the grammar mask covers chains (ember.structured.manager)
            if not draft:
                continue
            req.spec_token_ids = list(draft.token_ids)
            if draft.parents is not None:
                meta.parents[req.request_id] = draft.parents
            self._drafts[req.request_id] = draft
            if not exempt:
                budget -= len(draft)
        return meta

    def observe(self, sched_out, spec_outputs: dict[str, SpecOutput]) -> None:
        for item in sched_out.scheduled:
            rid = item.request.request_id
            draft = self._drafts.pop(rid, None)
            out = spec_outputs.get(rid)
            if draft is None or out is None:
                continue
            accepted = len(out.accepted_nodes)
            self.num_draft_tokens += out.num_draft_tokens
            self.num_accepted_tokens += accepted
            self.num_spec_steps += 1
            self.proposer.on_verified(item.request, draft, out.num_draft_tokens, out.accepted_nodes, out.node_argmax)
            b = self._backoff.setdefault(rid, _Backoff())
            if accepted:
                b.misses, b.cooldown = 0, 1
            else:
                b.misses += 1
                if b.misses >= self.max_misses:
                    b.skip, b.misses = b.cooldown, 0
                    b.cooldown = min(2 * b.cooldown, self.max_cooldown)
        self._drafts = {}

    def free(self, request_id: str) -> None:
        self._backoff.pop(request_id, None)
        self.proposer.free(request_id)

    def _may_speculate(self, req) -> bool:
        p = req.sampling_params
        if (p.logprobs is not None or p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
                or req.num_output_tokens < p.min_tokens):
            return False  # the verifier does not reproduce these exactly
        b = self._backoff.get(req.request_id)
        if b is not None and b.skip > 0:
            b.skip -= 1
            return False
        return True


class NoSpeculator:
    """Stands in when the engine has no speculator configured: the hooks do nothing."""

    num_draft_tokens = num_accepted_tokens = num_spec_steps = 0

    def check(self, params) -> None:
        pass

    def propose(self, running: list) -> None:
        return None

    def observe(self, sched_out, spec_outputs) -> None:
        pass

    def free(self, request_id: str) -> None:
        pass


def _is_seeded_sampling(req) -> bool:
    return req.sampling_params.seed is not None and req.sampling_params.temperature > 0


def max_spec_tokens(device_type: str, dtype_bytes: int) -> int:
    """Tokens per step (decodes + drafts) before drafts stop. A GPU verifies thousands of tokens for the
    price of one decode. A CPU step costs streaming the weights once plus ~600 framework calls, and beyond a
    few dozen tokens each extra token costs its own matrix work: drafts there must stay within that knee
    (measured with `ember bench offline --speculator`: 4 requests x 25-token trees ran at 0.87x, 4 x 9-token
    chains at 3.3x); 16-bit matmuls are ~4x faster than fp32 on CPUs with bf16 units, so the knee is higher."""
    if device_type != "cpu":
        return 2048
    return 48 if dtype_bytes >= 4 else 96


def build_speculator(spec_cfg, device_type: str = "cpu", dtype_bytes: int = 2):
    """A Speculator from `build.speculator` (ember.config SpeculatorConfig), or NoSpeculator for None.
    `dtype_bytes`: the engine's activation dtype size (the CPU budget depends on it)."""
    if spec_cfg is None:
        return NoSpeculator()
    w, n, g = spec_cfg.lookahead_windows_size, spec_cfg.lookahead_ngram_size, spec_cfg.lookahead_verification_set_size
    pl = PromptLookupProposer(max_draft_len=max(1, n - 1)) if spec_cfg.enable_b10_lookahead else None
    proposer = LookaheadProposer(w, n, g, prompt_lookup=pl)
    # our tree: window W x (N-1), G branches of N-1, the prompt-lookup chain of N-1
    tree_len = (w + g + (1 if pl else 0)) * max(0, n - 1)
    max_draft_len = max(spec_cfg.max_draft_len, tree_len)
    return Speculator(proposer, max_draft_len, max_spec_tokens(device_type, dtype_bytes),
                      maxima={"lookahead_windows_size": w, "lookahead_ngram_size": n,
                              "lookahead_verification_set_size": g})
