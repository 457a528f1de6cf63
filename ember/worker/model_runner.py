"""ModelRunner: turns a SchedulerOutput into one forward pass and the sampled tokens.

batch -> flat tensors (token ids, positions, attention metadata over the paged KV cache) -> forward
-> logits at each sampling request's last position -> Sampler. A request with drafts (ember.spec) gets
logits at its last drafts + 1 positions and goes to the verifier instead. Owns the model, the KV cache and the
per-request seeded generators.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ember.distributed.parallel import SINGLE, ParallelContext
from ember.layers.attention import build_attention_metadata
from ember.layers.cpu_pack import pack_model_for_cpu
from ember.layers.sampler import Sampler
from ember.models.registry import get_model_class
from ember.outputs import TokenLogprob
from ember.spec.grammar import build_draft_bitmask
from ember.spec.tree import (SpecDecodeMetadata, SpecOutput, build_tree_mask, copy_kv_slots, kv_moves,
                             rope_positions)
from ember.spec.verify import verify_drafts
from ember.structured.bitmask import apply_bitmask, build_grammar_bitmask
from ember.worker.kv_cache import allocate_kv_caches, kv_cache_bytes_per_block
from ember.worker.sampling_inputs import build_sampling_metadata

logger = logging.getLogger(__name__)


@dataclass
class ModelRunnerOutput:
    """Per request that sampled this step: its new tokens (accepted drafts + 1), logprobs when asked for."""

    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    spec: dict[str, SpecOutput] = field(default_factory=dict)  # requests that verified drafts


@dataclass
class ForwardMetadata:
    """One forward pass as plain data: what every tensor-parallel rank needs to run it (no Request objects)."""

    token_ids: list[int]  # [T] flat, grouped by sequence
    positions: list[int]  # [T] rope positions
    query_lens: list[int]  # [B] new tokens per sequence
    seq_lens: list[int]  # [B] KV length per sequence after this step
    block_tables: list[list[int]]  # [B][blocks] KV block ids per sequence
    sample_rows: list[int]  # flat indices whose logits are wanted
    tree_mask: torch.Tensor | None = None  # [T, M] bool on CPU: drafts' attention (AttentionMetadata.tree_mask)


class ModelRunner:
    def __init__(self, checkpoint, dtype: torch.dtype, device: torch.device, block_size: int,
                 parallel: ParallelContext = SINGLE, is_deterministic: bool = False):
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.hf_config = checkpoint.hf_config
        self.parallel = parallel  # this rank's slice of the model (tensor_parallel_count > 1)
        self.is_deterministic = is_deterministic  # ember.deterministic: batch-invariant attention in every forward
        self.mirror = None  # TP rank 0: ember.worker.executor.StepMirror, ships each forward/KV move to the workers
        model_cls = get_model_class(checkpoint.architecture)
        with torch.device(device):
            self.model = (model_cls(checkpoint.hf_config, dtype=dtype, device=device, parallel=parallel)
                          if parallel.is_parallel else model_cls(checkpoint.hf_config, dtype=dtype, device=device))
        self.model.load_weights(checkpoint.iter_weights())
        self.model.eval()
        pack_model_for_cpu(self.model)  # bf16 on CPU: weights in oneDNN's layout, ~2x faster matrix-vector
        self.kv_cache_dtype = self.model.kv_cache_dtype or dtype  # an engine may quantize the cache (fp8)
        self.vocab_size = int(self.hf_config.vocab_size)
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator] = {}
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.lora_manager = None  # ember.lora.LoRAManager when adapters are served; set by the engine setup
        self.graph_runner = None  # ember.worker.cuda_graphs.CUDAGraphRunner on CUDA (all-decode steps)
        self.compiled = None  # ember.models.compiled.CompiledForward on CPU when ember.compile is set

    # ---- KV cache -------------------------------------------------------------------------------
    def bytes_per_block(self) -> int:
        m = self.model
        return kv_cache_bytes_per_block(m.num_layers, self.block_size, m.num_kv_heads, m.head_dim, self.kv_cache_dtype)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        m = self.model
        self.num_blocks = num_blocks
        # on CUDA one scratch block beyond the block manager's: padding rows of graphed decode steps write there
        extra = int(self.device.type == "cuda")
        self.kv_caches = allocate_kv_caches(m.num_layers, num_blocks + extra, self.block_size, m.num_kv_heads,
                                            m.head_dim, self.kv_cache_dtype, self.device)

    def enable_cuda_graphs(self, max_seq_len: int, max_batch_size: int) -> None:
        """Capture decode forwards per batch-size bucket (CUDA, single rank); a failed capture stays eager."""
        if self.device.type != "cuda" or self.parallel.is_parallel or not self.kv_caches:
            return
        from ember.worker.cuda_graphs import CUDAGraphRunner, graph_buckets

        self.graph_runner = CUDAGraphRunner(self.model, self.kv_caches, block_size=self.block_size,
                                            max_blocks_per_seq=-(-max_seq_len // self.block_size),
                                            pad_block_id=self.num_blocks, buckets=graph_buckets(max_batch_size))
        self.graph_runner.capture()

    def enable_compile(self, max_num_tokens: int) -> None:
        """Compile the model's layers (CPU, single rank) and warm both graphs up now; any failure stays eager."""
        from ember.models.compiled import CompiledForward, can_compile

        reason = can_compile(self.model, self.device)
        if reason is None and self.lora_manager is not None:
            reason = "LoRA adapters run eagerly"
        if reason is not None or not self.kv_caches:
            logger.warning("compiled forward off: %s", reason or "no KV cache")
            return
        try:
            compiled = CompiledForward(self.model)
            seconds = compiled.warm_up(self.kv_caches, self.block_size, max_num_tokens)
        except Exception as e:  # noqa: BLE001 - an op the compiler cannot take: run eagerly
            logger.warning("torch.compile of the forward failed (%s); running eagerly", e)
            return
        self.compiled = compiled
        logger.info("compiled forward ready in %.1f s", seconds)

    # ---- one step -------------------------------------------------------------------------------
    def free_request(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    @torch.inference_mode()
    def execute(self, sched_out, spec: SpecDecodeMetadata | None = None) -> ModelRunnerOutput:
        """Run one step for `sched_out` (ember.core SchedulerOutput); sample where `is_sampling`.
        Requests with drafts are verified (ember.spec.verify); `spec` gives the shape of tree drafts."""
        for rid in sched_out.finished_ids:
            self.generators.pop(rid, None)
        token_ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        block_tables: list[list[int]] = []
        trees: list[list[int] | None] = []  # per scheduled request: parents of its tree drafts, or None
        sample_rows: list[int] = []  # flat index of each sampled position (drafts + 1 per request)
        sampling_items = []
        for item in sched_out.scheduled:
            n, start = item.num_new_tokens, item.num_computed_tokens
            tree = spec.tree(item.request.request_id, item.num_draft_tokens) if spec is not None else None
            trees.append(tree)
            token_ids.extend(item.token_ids())
            positions.extend(rope_positions(start, n, item.num_draft_tokens, tree))
            query_lens.append(n)
            seq_lens.append(start + n)
            block_tables.append(item.block_ids)
            if item.is_sampling:
                sample_rows.extend(range(len(token_ids) - item.num_sampled_positions, len(token_ids)))
                sampling_items.append((item, tree))
        out = ModelRunnerOutput()
        if not token_ids:
            return out
        tree_mask = build_tree_mask(sched_out.scheduled, trees)  # None: no drafts this step
        if self.lora_manager is not None:  # each token's adapter slot, read by the LoRA layers
            self.lora_manager.prepare([(item.request.lora_name, item.num_new_tokens) for item in sched_out.scheduled])
        logits = self.forward(ForwardMetadata(token_ids, positions, query_lens, seq_lens, block_tables, sample_rows,
                                              tree_mask))  # [R, V] float32
        if self.lora_manager is not None:
            self.lora_manager.batch = None  # the mapping belongs to this forward only
        if not sampling_items:
            return out
        if not any(item.num_draft_tokens for item, _ in sampling_items):
            self._sample(logits, [item.request for item, _ in sampling_items], out)
            return out
        plain_rows, plain_reqs, spec_rows, spec_items = [], [], [], []
        row = 0
        for item, tree in sampling_items:
            k = item.num_sampled_positions
            if item.num_draft_tokens:
                spec_rows.extend(range(row, row + k))
                spec_items.append((item, tree))
            else:
                plain_rows.append(row)
                plain_reqs.append(item.request)
            row += k
        if plain_reqs:
            self._sample(logits[plain_rows], plain_reqs, out)
        self._verify(logits[spec_rows], spec_items, out)
        return out

    @torch.inference_mode()
    def forward(self, step: ForwardMetadata) -> torch.Tensor | None:
        """The forward pass every tensor-parallel rank runs -> logits at `sample_rows` [R, V] float32 (rank 0;
        None on the others, or when nothing samples)."""
        if self.mirror is not None:
            self.mirror.send_forward(step)
        dev = self.device
        hidden = self._graphed_forward(step)
        if hidden is not None:
            return self._logits(hidden, step)
        input_ids = torch.tensor(step.token_ids, dtype=torch.int64).to(dev, non_blocking=True)  # [T]
        pos = torch.tensor(step.positions, dtype=torch.int64).to(dev, non_blocking=True)  # [T]
        meta = build_attention_metadata(step.query_lens, step.seq_lens, step.block_tables, self.block_size, dev,
                                        is_deterministic=self.is_deterministic)
        if step.tree_mask is not None:
            meta.tree_mask = step.tree_mask.to(dev)
        forward = self.compiled.forward if self.compiled is not None else self.model
        hidden = forward(input_ids, pos, self.kv_caches, meta)  # [T, H]
        return self._logits(hidden, step)

    def _logits(self, hidden: torch.Tensor, step: ForwardMetadata) -> torch.Tensor | None:
        if not step.sample_rows:
            return None
        rows = torch.tensor(step.sample_rows, dtype=torch.int64, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows))  # [R, V] float32

    def _graphed_forward(self, step: ForwardMetadata) -> torch.Tensor | None:
        """Replay a captured decode graph when the step is all-decode without masks or adapters; else None."""
        if self.graph_runner is None or step.tree_mask is not None or any(n != 1 for n in step.query_lens):
            return None
        if self.lora_manager is not None and self.lora_manager.batch is not None:
            return None
        meta = build_attention_metadata(step.query_lens, step.seq_lens, step.block_tables, self.block_size, "cpu")
        run = self.graph_runner.maybe_graph(meta)
        if run is None:
            return None
        return run(torch.tensor(step.token_ids, dtype=torch.int64), torch.tensor(step.positions, dtype=torch.int64))

    def move_kv(self, src: list[int], dst: list[int]) -> None:
        """Copy KV slots src -> dst in every layer (accepted tree drafts), on every rank."""
        if self.mirror is not None and src:
            self.mirror.send_kv_move(src, dst)
        copy_kv_slots(self.kv_caches, src, dst)

    def _sample(self, logits: torch.Tensor, reqs: list, out: ModelRunnerOutput) -> None:
        """One token per request from logits [N, V] (one row each)."""
        grammar = build_grammar_bitmask([getattr(r, "matcher", None) for r in reqs], self.vocab_size)
        if grammar is not None:
            apply_bitmask(logits, *grammar)  # tokens the grammar forbids -> -inf, in place
        smeta = build_sampling_metadata(reqs, self.generators, self.vocab_size, self.device)
        sampled = self.sampler(logits, smeta)
        ids = sampled.token_ids.tolist()  # the one host sync of the step
        chosen = sampled.logprobs.tolist() if sampled.logprobs is not None else None
        top_vals = top_ids = None
        if sampled.top_logprobs is not None:
            top_vals, top_ids = (t.tolist() for t in sampled.top_logprobs)
        for i, req in enumerate(reqs):
            out.sampled_token_ids[req.request_id] = [ids[i]]
            k = req.sampling_params.logprobs
            if k is not None and chosen is not None:
                top = list(zip(top_ids[i][:k], top_vals[i][:k])) if k and top_ids is not None else []
                out.logprobs[req.request_id] = [TokenLogprob(ids[i], chosen[i], top)]

    def _verify(self, logits: torch.Tensor, items: list, out: ModelRunnerOutput) -> None:
        """Verify drafts: logits [R, V] hold drafts + 1 rows per request. Accepted tree paths get their
        K/V moved to where plain decoding would have put it (the scheduler truncates the rest)."""
        row_reqs = [item.request for item, _ in items for _ in range(item.num_sampled_positions)]
        smeta = build_sampling_metadata(row_reqs, self.generators, self.vocab_size, self.device)
        drafts = [item.request.spec_token_ids[:item.num_draft_tokens] for item, _ in items]
        grammar = build_draft_bitmask([getattr(item.request, "matcher", None) for item, _ in items], drafts,
                                      self.vocab_size)
        if grammar is not None:
            apply_bitmask(logits, *grammar)  # each verified position masked by the grammar state it sees
        tokens, spec_outs = verify_drafts(logits, smeta, drafts, [tree for _, tree in items])
        src, dst = [], []
        for (item, tree), toks, so in zip(items, tokens, spec_outs):
            rid = item.request.request_id
            out.sampled_token_ids[rid] = toks
            out.spec[rid] = so
            if tree is not None:
                s, d = kv_moves(item, so.accepted_nodes, self.block_size)
                src.extend(s)
                dst.extend(d)
        self.move_kv(src, dst)
