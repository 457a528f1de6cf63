"""The compiled CPU forward: `torch.compile` (Inductor's C++/OpenMP backend) over a model's layers, with the
paged-attention call left outside the graph (piecewise, as vLLM does).

Each step's forward is a few hundred small tensor ops; run eagerly, every one of them pays Python and
dispatcher overhead, which dominates a batch-1 decode step of a small model. Compiled, the norms, residual
adds, rotary and gated activations between two matmuls fuse into one C++ loop each, and the whole forward is
one generated Python function. What stays opaque to the compiler:
- paged attention, as the custom op `ember::paged_attention`: it receives the step's `AttentionMetadata`
  inside an opaque `AttentionStep` handle, so the graph never specializes on sequence lengths, block tables
  or masks (its Python plan is the eager backend's, unchanged);
- the re-laid bf16 matmuls (`ember_cpu::bf16_linear` on AMX tiles, or `ember::packed_linear` for oneDNN's
  packed weights; ember.layers.cpu_pack), which Inductor would otherwise want as frozen constants.
The token count is dynamic: one graph serves every batch of two or more tokens, and a specialized one the
single-token (batch-1 decode) steps; both are compiled by `warm_up` at start-up, so no request pays for it.
"""

from __future__ import annotations

import logging
import time

import torch
from torch._library.opaque_object import get_opaque_type_name, register_opaque_type
from torch._opaque_base import OpaqueBase

from ember.layers import cpu_kernels
from ember.layers.attention import AttentionBackend, AttentionMetadata, build_attention_metadata

logger = logging.getLogger(__name__)


class AttentionStep(OpaqueBase):
    """One step's attention inputs as a compiled graph sees them: a handle it passes to every attention call
    without looking inside. Holds the eager backend and the step's metadata."""

    def __init__(self, backend: AttentionBackend, metadata: AttentionMetadata):
        self.backend = backend
        self.metadata = metadata


register_opaque_type(AttentionStep, typ="reference")

_lib = torch.library.Library("ember", "FRAGMENT")
_lib.define(
    "paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) kv_cache, "
    f"{get_opaque_type_name(AttentionStep)} step, float scale, int? sliding_window, float? logit_softcap, "
    "Tensor? kv_scale) -> Tensor"
)


def _paged_attention_impl(q, k, v, kv_cache, step, scale, sliding_window, logit_softcap, kv_scale):
    out = step.backend.forward(q, k, v, kv_cache, step.metadata, scale=scale, sliding_window=sliding_window,
                               logit_softcap=logit_softcap, kv_scale=kv_scale)
    return out.contiguous()  # [T, Hq, D]: the compiled caller checks the layout it was promised


_lib.impl("paged_attention", _paged_attention_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("ember::paged_attention", lib=_lib)
def _paged_attention_fake(q, k, v, kv_cache, step, scale, sliding_window, logit_softcap, kv_scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)  # [T, Hq, D]


def paged_attention(backend: AttentionBackend, q, k, v, kv_cache, metadata, *, scale: float,
                    sliding_window: int | None = None, logit_softcap: float | None = None,
                    kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The models' one attention call: `backend.forward` when run eagerly (metadata is AttentionMetadata),
    the opaque custom op inside a compiled forward (metadata is an AttentionStep). q [T, Hq, D] -> [T, Hq, D]."""
    if isinstance(metadata, AttentionStep):
        return torch.ops.ember.paged_attention(q, k, v, kv_cache, metadata, scale, sliding_window, logit_softcap,
                                               kv_scale)
    return backend.forward(q, k, v, kv_cache, metadata, scale=scale, sliding_window=sliding_window,
                           logit_softcap=logit_softcap, kv_scale=kv_scale)


def can_compile(model, device: torch.device) -> str | None:
    """None when `model` can run compiled on `device`; else the reason it runs eagerly."""
    if device.type != "cpu":
        return f"compiled forward is for CPU (device {device.type} replays CUDA graphs instead)"
    if model.parallel.is_parallel:
        return "tensor-parallel ranks run eagerly"
    if not hasattr(getattr(model, "model", None), "body"):
        return f"{type(model).__name__} has no compilable body"
    return None


class CompiledForward:
    """`model.forward` with the decoder body compiled: `forward(input_ids, positions, kv_caches, metadata)`
    returns the same final hidden states [T, H]. The rotary lookup stays eager (longrope reads the metadata)."""

    def __init__(self, model):
        self.model = model
        self.decoder = model.model
        self.backend = next(m.backend for m in model.modules() if isinstance(getattr(m, "backend", None),
                                                                             AttentionBackend))
        cpu_kernels.load()  # before tracing: the graph reads cpu_kernels.LOADED (float32 Linears), never load()
        self.body = torch.compile(self.decoder.body, fullgraph=True, dynamic=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata) -> torch.Tensor:
        with torch.inference_mode():
            if not input_ids.is_inference():  # guards check the dispatch keys: one kind of input, one graph
                input_ids = input_ids.clone()
            cos, sin = self.decoder.rotary.cos_sin(positions, metadata)  # [T, 1, R] each
            if input_ids.shape[0] > 1:  # one graph for every token count >= 2 (1 has its own)
                for t in (input_ids, cos, sin):
                    torch._dynamo.mark_dynamic(t, 0)
            return self.body(input_ids, cos, sin, kv_caches, AttentionStep(self.backend, metadata))

    def warm_up(self, kv_caches: list[torch.Tensor], block_size: int, max_num_tokens: int) -> float:
        """Compile both graphs (one token; many tokens) by running them on a scratch sequence in block 0,
        which every real request overwrites before reading. Returns the seconds it took."""
        t0 = time.perf_counter()
        num_blocks = kv_caches[0].shape[1]
        num_tokens = max(2, min(64, max_num_tokens, num_blocks * block_size))
        for n in (num_tokens, 1):
            blocks = list(range(-(-n // block_size)))
            meta = build_attention_metadata([n], [n], [blocks], block_size, "cpu")
            self.forward(torch.zeros(n, dtype=torch.int64), torch.arange(n), kv_caches, meta)
        return time.perf_counter() - t0
