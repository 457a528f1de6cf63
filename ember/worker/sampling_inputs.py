"""The sampler's per-request settings, kept as tensors for as long as a request runs (the sampling half
of the runner's persistent batch).

A request's parameters are written into its row once, when it arrives (`add`); each step `metadata`
gathers the rows that sample (a request verifying drafts repeats its row once per verified position)
into a `SamplingMetadata` with a few index_selects. Penalty state is incremental: a [rows, V] count of
each row's output tokens (presence/frequency penalties) and a [rows, V] mask of its prompt tokens
(repetition penalty), updated with each step's new tokens (`append_tokens`), never rebuilt from a
history. Seeded generators are per request id and outlive a preemption (the row does not), so a
seeded request samples the same tokens whether or not it was evicted.
"""

from __future__ import annotations

import torch

from ember.layers.sampler import SamplingMetadata

_FLOAT_COLUMNS = {  # name -> (SamplingParams field, value meaning "off")
    "top_ps": ("top_p", 1.0),
    "min_ps": ("min_p", 0.0),
    "presence_penalties": ("presence_penalty", 0.0),
    "frequency_penalties": ("frequency_penalty", 0.0),
    "repetition_penalties": ("repetition_penalty", 1.0),
}


class SamplingState:
    """Per-row sampling tensors for the runner's rows (see the module docstring)."""

    def __init__(self, vocab_size: int, device: torch.device, num_rows: int = 8):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.capacity = 0
        self.temperatures = torch.empty(0, dtype=torch.float32, device=self.device)  # [rows]
        self.top_ks = torch.empty(0, dtype=torch.int64, device=self.device)  # [rows] (vocab size: off)
        self.columns = {name: torch.empty(0, dtype=torch.float32, device=self.device) for name in _FLOAT_COLUMNS}
        self.output_counts: torch.Tensor | None = None  # [rows, V] float32, allocated on the first penalty
        self.prompt_mask: torch.Tensor | None = None  # [rows, V] bool, allocated on the first repetition penalty
        self.params: list = []  # per row: SamplingParams (None: free row)
        self.uses: list[frozenset[str]] = []  # per row: the non-default columns ("top_ks" included)
        self.banned: list[list[int]] = []  # per row: eos + stop ids, masked while outputs < min_tokens
        self.biases: list[tuple[list[int], list[float]] | None] = []  # per row: logit_bias as (ids, values)
        self.num_outputs: list[int] = []  # per row: outputs so far
        self.request_ids: list[str | None] = []
        self.generators: dict[str, torch.Generator] = {}  # request id -> seeded generator (until it finishes)
        self._grow(num_rows)

    # ---- rows -----------------------------------------------------------------------------------
    def _grow(self, num_rows: int) -> None:
        if num_rows <= self.capacity:
            return
        new = max(num_rows, 2 * self.capacity)
        extra = new - self.capacity

        def pad(t: torch.Tensor, fill) -> torch.Tensor:
            tail = torch.full((extra, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
            return torch.cat([t, tail])

        self.temperatures = pad(self.temperatures, 1.0)
        self.top_ks = pad(self.top_ks, self.vocab_size)
        self.columns = {name: pad(t, _FLOAT_COLUMNS[name][1]) for name, t in self.columns.items()}
        if self.output_counts is not None:
            self.output_counts = pad(self.output_counts, 0.0)
        if self.prompt_mask is not None:
            self.prompt_mask = pad(self.prompt_mask, False)
        for lst, fill in ((self.params, None), (self.uses, frozenset()), (self.banned, []), (self.biases, None),
                          (self.num_outputs, 0),
                          (self.request_ids, None)):
            lst.extend([fill] * extra)
        self.capacity = new

    def add(self, row: int, request_id: str, params, eos_token_ids: list[int], prompt_token_ids: list[int],
            output_token_ids: list[int]) -> None:
        """Write a request's settings into `row` (once per admission; O(prompt) only for repetition penalty)."""
        self._grow(row + 1)
        self.params[row], self.request_ids[row] = params, request_id
        self.temperatures[row] = params.temperature
        uses = set()
        top_k = params.top_k if params.top_k > 0 else self.vocab_size
        self.top_ks[row] = top_k
        if top_k != self.vocab_size:
            uses.add("top_ks")
        for name, (field_name, off) in _FLOAT_COLUMNS.items():
            value = getattr(params, field_name)
            self.columns[name][row] = value
            if value != off:
                uses.add(name)
        self.uses[row] = frozenset(uses)
        if uses & {"presence_penalties", "frequency_penalties", "repetition_penalties"}:
            if self.output_counts is None:
                self.output_counts = torch.zeros(self.capacity, self.vocab_size, dtype=torch.float32,
                                                 device=self.device)
            self.output_counts[row].zero_()
            self._count(row, output_token_ids)
        if "repetition_penalties" in uses:
            if self.prompt_mask is None:
                self.prompt_mask = torch.zeros(self.capacity, self.vocab_size, dtype=torch.bool, device=self.device)
            self.prompt_mask[row].zero_()
            ids = [t for t in prompt_token_ids if 0 <= t < self.vocab_size]
            if ids:
                self.prompt_mask[row, torch.tensor(ids, dtype=torch.int64, device=self.device)] = True
        self.banned[row] = [t for t in list(eos_token_ids) + list(params.stop_token_ids) if 0 <= t < self.vocab_size]
        bias = {t: v for t, v in (params.logit_bias or {}).items() if 0 <= t < self.vocab_size}
        self.biases[row] = (list(bias), list(bias.values())) if bias else None
        self.num_outputs[row] = len(output_token_ids)
        if params.seed is not None and params.temperature > 0 and request_id not in self.generators:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed)
            self.generators[request_id] = gen

    def remove(self, row: int, is_finished: bool) -> None:
        """Free `row`; a finished request also loses its generator (a preempted one keeps it)."""
        rid = self.request_ids[row]
        if is_finished and rid is not None:
            self.generators.pop(rid, None)
        self.params[row], self.request_ids[row], self.uses[row] = None, None, frozenset()
        self.biases[row] = None

    def forget(self, request_id: str) -> None:
        """A request finished while it held no row (e.g. aborted while preempted)."""
        self.generators.pop(request_id, None)

    def append_tokens(self, row: int, token_ids: list[int]) -> None:
        """Outputs the scheduler accepted since the last step: O(len(token_ids))."""
        self.num_outputs[row] += len(token_ids)
        if self.output_counts is not None and self.uses[row] & {"presence_penalties", "frequency_penalties",
                                                                 "repetition_penalties"}:
            self._count(row, token_ids)

    def _count(self, row: int, token_ids: list[int]) -> None:
        ids = [t for t in token_ids if 0 <= t < self.vocab_size]
        if ids:
            idx = torch.tensor(ids, dtype=torch.int64, device=self.device)
            self.output_counts[row].index_put_((idx,), torch.ones(len(ids), device=self.device), accumulate=True)

    # ---- one step -------------------------------------------------------------------------------
    def metadata(self, rows: list[int], completed: list[bool] | None = None) -> SamplingMetadata:
        """Settings of the sampled positions: `rows[i]` is the row of logits row i. `completed[i]`: that row's
        grammar is complete (only EOS may follow), so min_tokens must not ban EOS."""
        idx = torch.tensor(rows, dtype=torch.int64, device=self.device)
        uses = frozenset().union(*(self.uses[r] for r in rows)) if rows else frozenset()
        temps = self.temperatures.index_select(0, idx)
        temp_list = [self.params[r].temperature for r in rows]

        def column(name: str) -> torch.Tensor | None:
            return self.columns[name].index_select(0, idx) if name in uses else None

        rep = column("repetition_penalties")
        presence, frequency = column("presence_penalties"), column("frequency_penalties")
        counts = None
        if presence is not None or frequency is not None or rep is not None:
            counts = self.output_counts.index_select(0, idx)  # [N, V]
        banned = None
        for i, r in enumerate(rows):
            p = self.params[r]
            if p.min_tokens and self.num_outputs[r] < p.min_tokens and not (completed and completed[i]):
                banned = banned or [[] for _ in rows]
                banned[i] = self.banned[r]
        return SamplingMetadata(
            temperatures=temps,
            top_ps=column("top_ps"),
            top_ks=self.top_ks.index_select(0, idx) if "top_ks" in uses else None,
            min_ps=column("min_ps"),
            presence_penalties=presence, frequency_penalties=frequency, repetition_penalties=rep,
            output_token_counts=counts,
            prompt_token_mask=self.prompt_mask.index_select(0, idx) if rep is not None else None,
            banned_token_ids=banned,
            generators=[self.generators.get(self.request_ids[r]) if self.params[r].temperature > 0 else None
                        for r in rows],
            num_logprobs=[self.params[r].logprobs for r in rows],
            is_all_greedy=all(t == 0 for t in temp_list),
            is_all_random=all(t > 0 for t in temp_list),
            logit_bias=self._logit_bias(rows),
        )

    def _logit_bias(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The biased rows' ([2, K] (logits row, token id), [K] value) pairs; None when no row has a bias."""
        at: list[int] = []
        ids: list[int] = []
        values: list[float] = []
        for i, r in enumerate(rows):
            bias = self.biases[r]
            if bias is not None:
                at.extend([i] * len(bias[0]))
                ids.extend(bias[0])
                values.extend(bias[1])
        if not ids:
            return None
        return (torch.tensor([at, ids], dtype=torch.int64, device=self.device),  # [2, K]
                torch.tensor(values, dtype=torch.float32, device=self.device))
