"""ModelRunner: turns a SchedulerOutput into one forward pass and the sampled tokens.

The runner keeps a persistent batch (ember.worker.input_batch): each running request has a row that
the step's deltas update in place (new tokens appended, block-table rows grown, sampling tensors and
penalty counts written once and updated incrementally). A step then is: apply the deltas -> host
tensors of the new tokens (ids, positions, attention metadata over the paged KV cache) -> forward ->
logits at each sampling request's last position -> grammar bitmask (from the step data) -> Sampler.
A request with drafts (ember.spec) gets logits at its last drafts + 1 positions and goes to the
verifier instead. Owns the model, the KV cache and the persistent batch; never reads a Request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ember.distributed.parallel import SINGLE, ParallelContext
from ember.layers.attention import build_attention_metadata
from ember.layers.cpu_pack import pack_model_for_cpu
from ember.layers.invariant_linear import make_batch_invariant
from ember.layers.row_groups import RowGroups, tail_grouping, tail_groups
from ember.layers.sampler import Sampler
from ember.models.registry import get_model_class
from ember.outputs import TokenLogprob
from ember.spec.tree import SpecDecodeMetadata, SpecOutput, build_tree_mask, copy_kv_slots, kv_moves
from ember.spec.verify import verify_drafts
from ember.structured.bitmask import apply_bitmask
from ember.worker.input_batch import InputBatch, StepInputs
from ember.worker.kv_cache import allocate_kv_caches, kv_cache_bytes_per_block
from ember.worker.sampling_inputs import SamplingState
from ember.worker.staging import PinnedStager

logger = logging.getLogger(__name__)


@dataclass
class ModelRunnerOutput:
    """Per request that sampled this step: its new tokens (accepted drafts + 1), logprobs when asked for."""

    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    spec: dict[str, SpecOutput] = field(default_factory=dict)  # requests that verified drafts
    # requests that asked for prompt logprobs: (first position, logprobs of the prompt tokens after positions
    # first, first + 1, ...) for this step's chunk
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprob]]] = field(default_factory=dict)
    kv_moves: tuple[list[int], list[int]] | None = None  # (src, dst) slots this rank moved after verifying
    # tree drafts: the executor hands them to the other ranks with the next step


@dataclass
class ForwardMetadata:
    """One forward pass: the step's host inputs, plus what only some steps need."""

    inputs: StepInputs  # token ids, positions, lengths, block-table rows, sampled positions
    tree_mask: torch.Tensor | None = None  # [T, M] bool on CPU: drafts' attention (AttentionMetadata.tree_mask)
    lora: object | None = None  # ember.lora.LoRABatchMetadata: per-token adapter slots; None: no adapter

    @property
    def sample_rows(self) -> list[int]:
        return self.inputs.sample_rows


class ModelRunner:
    def __init__(self, checkpoint, dtype: torch.dtype, device: torch.device, block_size: int,
                 parallel: ParallelContext = SINGLE, is_deterministic: bool = False):
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.hf_config = checkpoint.hf_config
        self.parallel = parallel  # this rank's slice of the model (tensor_parallel_count > 1)
        self.is_deterministic = is_deterministic  # ember.deterministic: batch-invariant attention in every forward
        model_cls = get_model_class(checkpoint.architecture)
        with torch.device(device):
            self.model = (model_cls(checkpoint.hf_config, dtype=dtype, device=device, parallel=parallel)
                          if parallel.is_parallel else model_cls(checkpoint.hf_config, dtype=dtype, device=device))
        self.model.load_weights(checkpoint.iter_weights())
        self.model.eval()
        pack_model_for_cpu(self.model)  # bf16 on CPU: weights laid out for AMX tiles (or oneDNN without AMX)
        if is_deterministic:  # every matmul as fixed-shape calls (attention: ember.layers.invariant_attention)
            tiles = make_batch_invariant(self.model, dtype)
            logger.info("ember.deterministic: batch-invariant matmuls (row tile: layers) %s", tiles)
        self.kv_cache_dtype = self.model.kv_cache_dtype or dtype  # an engine may quantize the cache (fp8)
        self.vocab_size = int(self.hf_config.vocab_size)
        self.sampler = Sampler()
        # rank 0 samples: it keeps the sampling half of the persistent batch; the other ranks only run forwards
        self.sampling = SamplingState(self.vocab_size, device) if parallel.rank == 0 else None
        self.batch = InputBatch(block_size, self.sampling)
        self.stager = PinnedStager(device)  # host -> device through pinned buffers (CUDA)
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.num_window_blocks = 0  # > 0: the sliding layers' own pool and table (ember.core.window_blocks)
        self.lora_manager = None  # ember.lora.LoRAManager when adapters are served; set by the engine setup
        self.graph_runner = None  # ember.worker.cuda_graphs.CUDAGraphRunner on CUDA (all-decode steps)
        self.compiled = None  # ember.models.compiled.CompiledForward on CPU when ember.compile is set

    # ---- KV cache -------------------------------------------------------------------------------
    def bytes_per_block(self) -> int:
        m = self.model
        return kv_cache_bytes_per_block(m.num_layers, self.block_size, m.num_kv_heads, m.head_dim, self.kv_cache_dtype)

    def window_layers(self) -> tuple[int, list[int]] | None:
        """(window, sliding layer indices) when the model's sliding layers can keep a pool of their own."""
        return self.model.sliding_window_layers()

    def allocate_kv_cache(self, num_blocks: int, num_window_blocks: int = 0) -> None:
        """num_window_blocks > 0: the sliding layers (window_layers) get a pool of that many blocks and their own
        block table (ember.core.window_blocks); the other layers get num_blocks."""
        m = self.model
        self.num_blocks, self.num_window_blocks = num_blocks, num_window_blocks
        # on CUDA one scratch block beyond the block manager's: padding rows of graphed decode steps write there
        extra = int(self.device.type == "cuda")
        sliding = set(self.window_layers()[1]) if num_window_blocks else set()
        full = iter(allocate_kv_caches(m.num_layers - len(sliding), num_blocks + extra, self.block_size,
                                       m.num_kv_heads, m.head_dim, self.kv_cache_dtype, self.device))
        window = iter(allocate_kv_caches(len(sliding), num_window_blocks + extra, self.block_size, m.num_kv_heads,
                                         m.head_dim, self.kv_cache_dtype, self.device))
        self.kv_caches = [next(window) if i in sliding else next(full) for i in range(m.num_layers)]
        self.batch = InputBatch(self.block_size, self.sampling, has_window_table=bool(num_window_blocks))

    def enable_cuda_graphs(self, max_seq_len: int, max_batch_size: int) -> None:
        """Capture decode forwards per batch-size bucket (CUDA, single rank); a failed capture stays eager."""
        if self.device.type != "cuda" or self.parallel.is_parallel or not self.kv_caches or self.num_window_blocks:
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
    @torch.inference_mode()
    def execute(self, sched_out, spec: SpecDecodeMetadata | None = None) -> ModelRunnerOutput:
        """Run one step for `sched_out` (ember.core SchedulerOutput); sample where `is_sampling`, masked by
        `sched_out.grammar` (ember.structured.manager.GrammarBitmask) when set. Requests with drafts are
        verified (ember.spec.verify); `spec` gives the shape of tree drafts. Every rank runs this with the
        same step; only rank 0 samples."""
        self.batch.apply(sched_out)
        out = ModelRunnerOutput()
        if not sched_out.scheduled:
            return out
        inputs, trees = self.batch.prepare(sched_out, spec)
        tree_mask = build_tree_mask(sched_out.scheduled, trees)  # None: no drafts this step
        # each token's adapter slot: travels in this forward's metadata to the LoRA layers
        lora = self.lora_manager.prepare(inputs.lora_items) if self.lora_manager is not None else None
        logits = self.forward(ForwardMetadata(inputs, tree_mask, lora))  # [R + Q, V] float32 (rank 0)
        if logits is None or self.sampling is None:
            return out
        if inputs.prompt_rows:  # the last Q rows: prompt positions of requests that asked for prompt logprobs
            num_sampled = len(inputs.sample_rows)
            self._prompt_logprobs(logits[num_sampled:], inputs, out)
            logits = logits[:num_sampled]  # [R, V]
        items = [(item, row, tree) for item, row, tree in zip(sched_out.scheduled, inputs.rows, trees)
                 if item.is_sampling]
        grammar = sched_out.grammar
        if grammar is not None and grammar.rows:
            apply_bitmask(logits, grammar.bitmask, grammar.rows)  # tokens the grammar forbids -> -inf, in place
        completed = grammar.completed_ids if grammar is not None else ()
        if not items:
            return out
        if not any(item.num_draft_tokens for item, _, _ in items):
            self._sample(logits, items, completed, out)
            return out
        plain_rows, plain, spec_rows, spec_items = [], [], [], []
        r = 0
        for item, row, tree in items:
            k = item.num_sampled_positions
            if item.num_draft_tokens:
                spec_rows.extend(range(r, r + k))
                spec_items.append((item, row, tree))
            else:
                plain_rows.append(r)
                plain.append((item, row, tree))
            r += k
        if plain:
            self._sample(logits[plain_rows], plain, completed, out)
        self._verify(logits[spec_rows], spec_items, out)
        return out

    @torch.inference_mode()
    def forward(self, step: ForwardMetadata) -> torch.Tensor | None:
        """The forward pass every tensor-parallel rank runs -> logits at `sample_rows`, then at `prompt_rows`
        [R + Q, V] float32 (rank 0; None on the others, or when no position is wanted)."""
        inputs = step.inputs
        hidden = self._graphed_forward(step)
        if hidden is not None:
            return self._logits(hidden, step)
        stage = self.stager.to_device
        meta = build_attention_metadata(inputs.query_lens, inputs.seq_lens, inputs.block_tables, self.block_size, "cpu",
                                        is_deterministic=self.is_deterministic)
        if self.stager.is_pinned or self.device.type != "cpu":
            meta.slot_mapping = stage("slot_mapping", meta.slot_mapping)
            meta.query_start_loc = stage("query_start_loc", meta.query_start_loc)
            meta.seq_lens = stage("seq_lens", meta.seq_lens)
            meta.block_tables = stage("block_tables", meta.block_tables)
        input_ids = stage("input_ids", inputs.input_ids)  # [T]
        pos = stage("positions", inputs.positions)  # [T]
        self.stager.mark_step()
        if step.tree_mask is not None:
            meta.tree_mask = step.tree_mask.to(self.device)
        meta.lora = step.lora
        if inputs.window_block_tables is not None:  # the sliding layers' view: their table, their slots
            meta.window = build_attention_metadata(inputs.query_lens, inputs.seq_lens, inputs.window_block_tables,
                                                   self.block_size, self.device, is_deterministic=self.is_deterministic)
            meta.window.tree_mask, meta.window.lora = meta.tree_mask, meta.lora
        forward = self.compiled.forward if self.compiled is not None else self.model
        with tail_grouping(self._tail_groups(inputs, meta)):
            hidden = forward(input_ids, pos, self.kv_caches, meta)  # [T, H]
        return self._logits(hidden, step)

    def _tail_groups(self, inputs, meta) -> RowGroups | None:
        """Prompt tails in matmul calls of their own (ember.layers.row_groups), unless every matmul already runs
        as fixed-shape tiles (ember.deterministic) or the step is all decodes."""
        if self.is_deterministic or meta.is_all_decode:
            return None
        seq_lens = torch.repeat_interleave(torch.tensor(meta.seq_lens_list), torch.tensor(meta.query_lens_list))  # [T]
        groups = tail_groups(torch.as_tensor(inputs.positions).cpu(), seq_lens, self.block_size)
        if groups is not None and self.device.type != "cpu":
            groups.tails, groups.rest = groups.tails.to(self.device), groups.rest.to(self.device)
        return groups

    def _logits(self, hidden: torch.Tensor, step: ForwardMetadata) -> torch.Tensor | None:
        rows = step.sample_rows + step.inputs.prompt_rows
        if not rows:
            return None
        if len(rows) == hidden.shape[0] and not step.inputs.prompt_rows:  # all-decode steps: no gather
            return self.model.compute_logits(hidden)  # [R, V] float32
        idx = torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True)
        return self.model.compute_logits(hidden.index_select(0, idx))  # [R, V] float32

    def _graphed_forward(self, step: ForwardMetadata) -> torch.Tensor | None:
        """Replay a captured decode graph when the step is all-decode without masks or adapters; else None."""
        inputs = step.inputs
        if self.graph_runner is None or step.tree_mask is not None or any(n != 1 for n in inputs.query_lens):
            return None
        if step.lora is not None:
            return None
        meta = build_attention_metadata(inputs.query_lens, inputs.seq_lens, inputs.block_tables, self.block_size, "cpu")
        run = self.graph_runner.maybe_graph(meta)
        if run is None:
            return None
        return run(inputs.input_ids, inputs.positions)

    def move_kv(self, src: list[int], dst: list[int]) -> None:
        """Copy KV slots src -> dst in every layer (accepted tree drafts, or another rank's moves)."""
        copy_kv_slots(self.kv_caches, src, dst)

    def _sample(self, logits: torch.Tensor, items: list, completed, out: ModelRunnerOutput) -> None:
        """One token per request from logits [N, V] (one row each); items: (ScheduledRequest, row, tree)."""
        rows = [row for _, row, _ in items]
        smeta = self.sampling.metadata(rows, [item.request_id in completed for item, _, _ in items]
                                       if completed else None)
        sampled = self.sampler(logits, smeta)
        ids = sampled.token_ids.tolist()  # the one host sync of the step
        chosen = sampled.logprobs.tolist() if sampled.logprobs is not None else None
        top_vals = top_ids = None
        if sampled.top_logprobs is not None:
            top_vals, top_ids = (t.tolist() for t in sampled.top_logprobs)
        for i, (item, row, _) in enumerate(items):
            rid = item.request_id
            out.sampled_token_ids[rid] = [ids[i]]
            k = smeta.num_logprobs[i]
            if k is not None and chosen is not None:
                top = list(zip(top_ids[i][:k], top_vals[i][:k])) if k and top_ids is not None else []
                out.logprobs[rid] = [TokenLogprob(ids[i], chosen[i], top)]

    def _prompt_logprobs(self, logits: torch.Tensor, inputs: StepInputs, out: ModelRunnerOutput) -> None:
        """Teacher-forced logprobs of prompt tokens from this chunk's logits [Q, V] (the raw model distribution)."""
        logprobs = torch.log_softmax(logits, dim=-1)  # [Q, V]
        targets = torch.tensor(inputs.prompt_targets, dtype=torch.int64).to(logprobs.device)  # [Q]
        chosen_t = logprobs.gather(1, targets[:, None])  # [Q, 1]
        ranks = ((logprobs > chosen_t).sum(dim=-1) + 1).tolist()
        chosen = chosen_t.squeeze(1).tolist()
        k = max(item[3] for item in inputs.prompt_items)
        top_vals = top_ids = None
        if k > 0:
            top = logprobs.topk(k, dim=-1)
            top_vals, top_ids = top.values.tolist(), top.indices.tolist()
        q = 0
        for rid, start, count, k_i in inputs.prompt_items:
            entries = []
            for j in range(q, q + count):
                top_j = list(zip(top_ids[j][:k_i], top_vals[j][:k_i])) if k_i else []
                entries.append(TokenLogprob(inputs.prompt_targets[j], chosen[j], top_j, ranks[j]))
            out.prompt_logprobs[rid] = (start, entries)
            q += count

    def _verify(self, logits: torch.Tensor, items: list, out: ModelRunnerOutput) -> None:
        """Verify drafts: logits [R, V] hold drafts + 1 rows per request (already grammar-masked). Accepted
        tree paths get their K/V moved to where plain decoding would have put it (the scheduler truncates
        the rest)."""
        rows = [row for item, row, _ in items for _ in range(item.num_sampled_positions)]
        smeta = self.sampling.metadata(rows)
        drafts = [item.draft_token_ids for item, _, _ in items]
        tokens, spec_outs = verify_drafts(logits, smeta, drafts, [tree for _, _, tree in items])
        src, dst = [], []
        for (item, _, tree), toks, so in zip(items, tokens, spec_outs):
            rid = item.request_id
            out.sampled_token_ids[rid] = toks
            out.spec[rid] = so
            if tree is not None:
                s, d = kv_moves(item, so.accepted_nodes, self.batch.block_ids(rid), self.block_size)
                src.extend(s)
                dst.extend(d)
        if src:
            self.move_kv(src, dst)
            out.kv_moves = (src, dst)
