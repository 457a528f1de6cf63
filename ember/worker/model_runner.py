"""ModelRunner: turns a SchedulerOutput into one forward pass and the sampled tokens.

batch -> flat tensors (token ids, positions, attention metadata over the paged KV cache) -> forward
-> logits at each sampling request's last position -> Sampler. Owns the model, the KV cache and the
per-request seeded generators.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ember.layers.attention import build_attention_metadata
from ember.layers.sampler import Sampler
from ember.models.registry import get_model_class
from ember.outputs import TokenLogprob
from ember.structured.bitmask import apply_bitmask, build_grammar_bitmask
from ember.worker.kv_cache import allocate_kv_caches, kv_cache_bytes_per_block
from ember.worker.sampling_inputs import build_sampling_metadata

logger = logging.getLogger(__name__)


@dataclass
class ModelRunnerOutput:
    """Per request that sampled this step: its new tokens, and their logprobs when asked for."""

    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, checkpoint, dtype: torch.dtype, device: torch.device, block_size: int):
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.hf_config = checkpoint.hf_config
        model_cls = get_model_class(checkpoint.architecture)
        with torch.device(device):
            self.model = model_cls(checkpoint.hf_config, dtype=dtype, device=device)
        self.model.load_weights(checkpoint.iter_weights())
        self.model.eval()
        self.vocab_size = int(self.hf_config.vocab_size)
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator] = {}
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0

    # ---- KV cache -------------------------------------------------------------------------------
    def bytes_per_block(self) -> int:
        m = self.model
        return kv_cache_bytes_per_block(m.num_layers, self.block_size, m.num_kv_heads, m.head_dim, self.dtype)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        m = self.model
        self.num_blocks = num_blocks
        self.kv_caches = allocate_kv_caches(m.num_layers, num_blocks, self.block_size, m.num_kv_heads,
                                            m.head_dim, self.dtype, self.device)

    # ---- one step -------------------------------------------------------------------------------
    def free_request(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    @torch.inference_mode()
    def execute(self, sched_out) -> ModelRunnerOutput:
        """Run one step for `sched_out` (ember.core SchedulerOutput); sample where `is_sampling`."""
        for rid in sched_out.finished_ids:
            self.generators.pop(rid, None)
        token_ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        block_tables: list[list[int]] = []
        sample_rows: list[int] = []  # flat index of the last token of each sampling request
        sampling_reqs = []
        for item in sched_out.scheduled:
            req, n = item.request, item.num_new_tokens
            start = item.num_computed_tokens
            token_ids.extend(item.token_ids())
            positions.extend(range(start, start + n))
            query_lens.append(n)
            seq_lens.append(start + n)
            block_tables.append(item.block_ids)
            if item.is_sampling:
                sample_rows.append(len(token_ids) - 1)
                sampling_reqs.append(req)
        out = ModelRunnerOutput()
        if not token_ids:
            return out
        dev = self.device
        input_ids = torch.tensor(token_ids, dtype=torch.int64).to(dev, non_blocking=True)  # [T]
        pos = torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True)  # [T]
        meta = build_attention_metadata(query_lens, seq_lens, block_tables, self.block_size, dev)
        hidden = self.model(input_ids, pos, self.kv_caches, meta)  # [T, H]
        if not sampling_reqs:
            return out
        rows = torch.tensor(sample_rows, dtype=torch.int64, device=dev)
        logits = self.model.compute_logits(hidden.index_select(0, rows))  # [N, V] float32
        grammar = build_grammar_bitmask([r.matcher for r in sampling_reqs], self.vocab_size)
        if grammar is not None:
            apply_bitmask(logits, *grammar)  # tokens the grammar forbids -> -inf, in place
        smeta = build_sampling_metadata(sampling_reqs, self.generators, self.vocab_size, dev)
        sampled = self.sampler(logits, smeta)
        ids = sampled.token_ids.tolist()  # the one host sync of the step
        chosen = sampled.logprobs.tolist() if sampled.logprobs is not None else None
        top_vals = top_ids = None
        if sampled.top_logprobs is not None:
            top_vals, top_ids = (t.tolist() for t in sampled.top_logprobs)
        for i, req in enumerate(sampling_reqs):
            out.sampled_token_ids[req.request_id] = [ids[i]]
            k = req.sampling_params.logprobs
            if k is not None and chosen is not None:
                top = list(zip(top_ids[i][:k], top_vals[i][:k])) if k and top_ids is not None else []
                out.logprobs[req.request_id] = [TokenLogprob(ids[i], chosen[i], top)]
        return out
