"""The runner's persistent batch: a row per running request, kept from its admission until it finishes or
is preempted, updated in place from each step's deltas (ember.core.outputs).

A row holds the request's known tokens (prompt + accepted outputs, appended as they arrive), its block
table (a row of one [rows, max_blocks] int32 tensor that grows by appended block ids) and its adapter.
`apply` takes a step's SchedulerOutput (rows freed for finished / preempted ids, new rows for new
requests, tokens and block ids appended for the others); `prepare` turns the step into host tensors for
the forward: the new tokens' ids and positions, lengths, and the scheduled rows' block tables. Both cost
the step's new tokens and rows, never a request's history.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch

from ember.spec.tree import rope_positions


@dataclass
class StepInputs:
    """One step's forward inputs on the host (built by `InputBatch.prepare`)."""

    input_ids: torch.Tensor  # [T] int64, grouped by sequence in batch order
    positions: torch.Tensor  # [T] int64 rope positions
    rows: list[int]  # [B] the persistent row of each scheduled request
    query_lens: list[int]  # [B] new tokens per sequence
    seq_lens: list[int]  # [B] KV length per sequence after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32 (a view of the persistent table when rows are 0..B-1)
    sample_rows: list[int]  # flat token indices whose logits are wanted (drafts + 1 per sampling request)
    lora_items: list[tuple[str | None, int]]  # [B] (adapter name or None, new tokens)
    window_block_tables: torch.Tensor | None = None  # [B, max_blocks] int32: the sliding layers' table, or None
    # prompt logprobs (SamplingParams.prompt_logprobs): flat token indices of this step's prompt positions whose
    # next token is a prompt token, that next token, and per asking request (id, first position, count, k)
    prompt_rows: list[int] = field(default_factory=list)
    prompt_targets: list[int] = field(default_factory=list)
    prompt_items: list[tuple[str, int, int, int]] = field(default_factory=list)


class InputBatch:
    """Rows of the running requests (see the module docstring). `sampling` (rank 0 only) mirrors every row
    change into the sampler's persistent tensors."""

    def __init__(self, block_size: int, sampling=None, num_rows: int = 8, max_blocks: int = 16,
                 has_window_table: bool = False):
        self.block_size = block_size
        self.sampling = sampling  # ember.worker.sampling_inputs.SamplingState, or None on worker ranks
        self.row_of: dict[str, int] = {}  # request id -> row
        self._free: list[int] = []  # heap of free rows below `num_rows_used`: the lowest is reused first
        self.num_rows_used = 0  # rows [0, num_rows_used) have been handed out
        self.token_ids: list[list[int]] = []  # per row: prompt + accepted outputs
        self.num_block_ids: list[int] = []  # per row: valid ids in its block table row
        self.lora_names: list[str | None] = []  # per row
        self.prompt_logprobs: list[tuple[int, int] | None] = []  # per row: (prompt length, k) when it asked
        self.block_table = torch.zeros(num_rows, max_blocks, dtype=torch.int32)  # [rows, max_blocks]
        # the sliding layers' table (ember.core.window_blocks), same rows; released entries keep stale ids
        self.window_table = _Table(num_rows, max_blocks) if has_window_table else None

    @property
    def num_rows(self) -> int:
        return len(self.row_of)

    # ---- deltas ---------------------------------------------------------------------------------
    def apply(self, sched_out) -> None:
        """Bring the rows up to date with one step's SchedulerOutput (before `prepare`)."""
        for rid in sched_out.finished_ids:
            self._remove(rid, is_finished=True)
        for rid in sched_out.preempted_ids:
            self._remove(rid, is_finished=False)
        for item in sched_out.scheduled:
            new = item.new_request
            if new is not None:
                if item.request_id in self.row_of:  # defensive: a held request sent whole replaces its row
                    self._remove(item.request_id, is_finished=False)
                row = self._add(new)
            else:
                row = self.row_of[item.request_id]
                if item.new_token_ids:
                    self.token_ids[row].extend(item.new_token_ids)
                    if self.sampling is not None:
                        self.sampling.append_tokens(row, item.new_token_ids)
            if item.new_block_ids or item.block_ids_start != self.num_block_ids[row]:
                self._write_blocks(row, item.block_ids_start, item.new_block_ids)
            if self.window_table is not None:
                self.window_table.write(row, item.window_block_ids_start, item.new_window_block_ids)

    def _add(self, new) -> int:
        if self._free:
            row = heapq.heappop(self._free)
        else:
            row = self.num_rows_used
            self.num_rows_used += 1
            if row >= self.block_table.shape[0]:
                self._resize(rows=2 * self.block_table.shape[0])
                if self.window_table is not None:
                    self.window_table.resize(rows=2 * self.window_table.table.shape[0])
            self.token_ids.append([])
            self.num_block_ids.append(0)
            self.lora_names.append(None)
            self.prompt_logprobs.append(None)
        self.row_of[new.request_id] = row
        self.token_ids[row] = list(new.prompt_token_ids) + list(new.output_token_ids)
        self.num_block_ids[row] = 0
        self.lora_names[row] = new.lora_name
        k = new.sampling_params.prompt_logprobs
        self.prompt_logprobs[row] = (len(new.prompt_token_ids), k) if k is not None else None
        if self.sampling is not None:
            self.sampling.add(row, new.request_id, new.sampling_params, new.eos_token_ids, new.prompt_token_ids,
                              new.output_token_ids)
        return row

    def _remove(self, request_id: str, is_finished: bool) -> None:
        row = self.row_of.pop(request_id, None)
        if row is None:
            if is_finished and self.sampling is not None:
                self.sampling.forget(request_id)
            return
        self.token_ids[row] = []
        self.num_block_ids[row] = 0
        self.lora_names[row] = None
        self.prompt_logprobs[row] = None
        if self.sampling is not None:
            self.sampling.remove(row, is_finished)
        heapq.heappush(self._free, row)

    def _write_blocks(self, row: int, start: int, block_ids: list[int]) -> None:
        end = start + len(block_ids)
        if end > self.block_table.shape[1]:
            self._resize(cols=max(end, 2 * self.block_table.shape[1]))
        if block_ids:
            self.block_table[row, start:end] = torch.tensor(block_ids, dtype=torch.int32)
        self.num_block_ids[row] = end

    def _resize(self, rows: int | None = None, cols: int | None = None) -> None:
        old = self.block_table
        table = torch.zeros(rows or old.shape[0], cols or old.shape[1], dtype=torch.int32)
        table[:old.shape[0], :old.shape[1]] = old
        self.block_table = table

    # ---- one step -------------------------------------------------------------------------------
    def prepare(self, sched_out, spec=None) -> tuple[StepInputs, list[list[int] | None]]:
        """The step's host inputs, and per scheduled request the parents of its tree drafts (or None)."""
        input_ids: list[int] = []
        positions: list[int] = []
        rows, query_lens, seq_lens, sample_rows, lora_items = [], [], [], [], []
        trees: list[list[int] | None] = []
        prompt_rows, prompt_targets, prompt_items = [], [], []
        for item in sched_out.scheduled:
            row = self.row_of[item.request_id]
            n, start, d = item.num_new_tokens, item.num_computed_tokens, item.num_draft_tokens
            tree = spec.tree(item.request_id, d) if spec is not None else None
            trees.append(tree)
            if n == 1 and not d:  # a decode step: its one new token, at its one position
                input_ids.append(self.token_ids[row][start])
                positions.append(start)
            else:
                input_ids.extend(self.token_ids[row][start:start + n - d])
                input_ids.extend(item.draft_token_ids)
                positions.extend(rope_positions(start, n, d, tree))
            wants = self.prompt_logprobs[row]
            if wants is not None and start < wants[0] - 1:  # positions whose next token is a prompt token
                count = min(start + n - d, wants[0] - 1) - start
                base = len(input_ids) - n
                prompt_rows.extend(range(base, base + count))
                prompt_targets.extend(self.token_ids[row][start + 1:start + 1 + count])
                prompt_items.append((item.request_id, start, count, wants[1]))
            rows.append(row)
            query_lens.append(n)
            seq_lens.append(start + n)
            lora_items.append((self.lora_names[row], n))
            if item.is_sampling:
                sample_rows.extend(range(len(input_ids) - item.num_sampled_positions, len(input_ids)))
        num_blocks = -(-max(seq_lens, default=1) // self.block_size)
        if rows == list(range(len(rows))):
            block_tables = self.block_table[:len(rows), :num_blocks]  # [B, max_blocks] view, no copy
        else:
            block_tables = self.block_table[torch.tensor(rows, dtype=torch.int64), :num_blocks]  # [B, max_blocks]
        window_tables = self.window_table.rows(rows, num_blocks) if self.window_table is not None else None
        step = StepInputs(torch.tensor(input_ids, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64),
                          rows, query_lens, seq_lens, block_tables, sample_rows, lora_items, window_tables,
                          prompt_rows, prompt_targets, prompt_items)
        return step, trees

    def block_ids(self, request_id: str) -> list[int]:
        """One row's block ids (for KV moves after tree verification)."""
        row = self.row_of[request_id]
        return self.block_table[row, :self.num_block_ids[row]].tolist()


class _Table:
    """A second block table over the same rows (the sliding layers'): written from deltas, read per step."""

    def __init__(self, num_rows: int, max_blocks: int):
        self.table = torch.zeros(num_rows, max_blocks, dtype=torch.int32)  # [rows, max_blocks]

    def write(self, row: int, start: int, block_ids: list[int]) -> None:
        end = start + len(block_ids)
        if end > self.table.shape[1]:
            self.resize(cols=max(end, 2 * self.table.shape[1]))
        if block_ids:  # NULL_BLOCK (-1) entries of an adopted prefix: any valid id, attention never reads them
            self.table[row, start:end] = torch.tensor(block_ids, dtype=torch.int32).clamp_(min=0)

    def resize(self, rows: int | None = None, cols: int | None = None) -> None:
        old = self.table
        self.table = torch.zeros(rows or old.shape[0], cols or old.shape[1], dtype=torch.int32)
        self.table[:old.shape[0], :old.shape[1]] = old

    def rows(self, rows: list[int], num_blocks: int) -> torch.Tensor:
        if num_blocks > self.table.shape[1]:
            self.resize(cols=num_blocks)
        return self.table[torch.tensor(rows, dtype=torch.int64), :num_blocks]  # [B, max_blocks]
