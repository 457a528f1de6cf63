"""Mixture-of-experts decoders: MixtralForCausalLM and Qwen3MoeForCausalLM. The Llama/Qwen3 decoder with the
dense MLP replaced by ember.layers.moe.FusedMoE on the sparse layers; HF's per-expert tensors are stacked at
load time. Tensor parallelism is not implemented for the experts yet (refused)."""

from __future__ import annotations

import re
from typing import Iterable

import torch

from ember.distributed.parallel import SINGLE, ParallelContext
from ember.layers.moe import FusedMoE
from ember.models.llama import LlamaForCausalLM, Qwen3ForCausalLM

_EXPERT = re.compile(r"^(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_PARTS = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


class _MoEMixin:
    """Swaps sparse layers' MLPs for FusedMoE and loads expert tensors into them."""

    def _install_experts(self, cfg, num_experts: int, intermediate: int, renormalize: bool, sparse, dtype, device,
                         parallel: ParallelContext) -> None:
        if parallel.is_parallel:
            raise ValueError(f"{type(self).__name__}: tensor parallelism over experts is not supported yet; use tp=1")
        for i, layer in enumerate(self.model.layers):
            if sparse(i):
                layer.mlp = FusedMoE(cfg.hidden_size, intermediate, num_experts, cfg.num_experts_per_tok,
                                     cfg.hidden_act, renormalize=renormalize, dtype=dtype, device=device)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        if getattr(self.config, "ember_quantization", None) is not None:
            return super().load_weights(weights)

        def dense():
            for name, tensor in weights:
                m = _EXPERT.match(name)
                if m and m.group(3) in _PARTS:
                    self.get_submodule(m.group(1) + ".mlp").load_expert(int(m.group(2)), _PARTS[m.group(3)], tensor)
                    continue
                yield name.replace(".block_sparse_moe.gate.", ".mlp.gate."), tensor

        super().load_weights(dense())
        for i, layer in enumerate(self.model.layers):
            if isinstance(layer.mlp, FusedMoE) and layer.mlp.missing_experts():
                raise ValueError(f"{type(self).__name__}: layer {i} missing from checkpoint: "
                                 + ", ".join(layer.mlp.missing_experts()[:10]))


class MixtralForCausalLM(_MoEMixin, LlamaForCausalLM):
    """Mixtral: every layer sparse, top-k of softmax renormalized."""

    def __init__(self, hf_config, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 parallel: ParallelContext = SINGLE):
        super().__init__(hf_config, dtype, device, parallel)
        self._install_experts(hf_config, hf_config.num_local_experts, hf_config.intermediate_size, True,
                              lambda i: True, dtype, self.device, parallel)


class Qwen3MoeForCausalLM(_MoEMixin, Qwen3ForCausalLM):
    """Qwen3-MoE: sparse layers per `decoder_sparse_step` / `mlp_only_layers`, renormalized iff norm_topk_prob."""

    def __init__(self, hf_config, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 parallel: ParallelContext = SINGLE):
        super().__init__(hf_config, dtype, device, parallel)
        cfg = hf_config
        only = set(getattr(cfg, "mlp_only_layers", None) or [])
        step = getattr(cfg, "decoder_sparse_step", 1) or 1
        self._install_experts(cfg, cfg.num_experts, cfg.moe_intermediate_size, bool(cfg.norm_topk_prob),
                              lambda i: i not in only and cfg.num_experts > 0 and (i + 1) % step == 0,
                              dtype, self.device, parallel)
