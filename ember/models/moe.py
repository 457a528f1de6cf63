"""Mixture-of-experts decoders: MixtralForCausalLM and Qwen3MoeForCausalLM. The Llama/Qwen3 decoder with the
dense MLP replaced by ember.layers.moe.FusedMoE on the sparse layers. Checkpoint experts arrive one tensor per
expert (HF: Mixtral's w1/w3/w2, Qwen3-MoE's gate/up/down_proj) or stacked over the experts ([E, ...]: GGUF,
transformers' fused `experts.gate_up_proj`); each expert's gate and up load into its fused gate|up Linear.
Under expert parallelism a rank skips the tensors of experts it does not hold."""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

from ember.distributed.parallel import SINGLE, ParallelContext
from ember.layers.moe import FusedMoE
from ember.models.llama import LlamaForCausalLM, Qwen3ForCausalLM

# a per-expert tensor: (layer prefix, expert, part, param)
_EXPERT = re.compile(r"^(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.(weight|\w+)$")
# every expert's tensor stacked on dim 0: (layer prefix, part)
_STACKED = re.compile(r"^(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|gate_proj|up_proj|"
                      r"down_proj)(?:\.weight)?$")
_PARTS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


class _MoEMixin:
    """Swaps sparse layers' MLPs for FusedMoE and maps checkpoint expert tensors onto their Linears."""

    def _install_experts(self, cfg, num_experts: int, intermediate: int, renormalize: bool, sparse, dtype, device,
                         parallel: ParallelContext) -> None:
        for i, layer in enumerate(self.model.layers):
            if sparse(i):
                layer.mlp = FusedMoE(cfg.hidden_size, intermediate, num_experts, cfg.num_experts_per_tok,
                                     cfg.hidden_act, renormalize=renormalize, dtype=dtype, device=device,
                                     parallel=parallel)

    def _holds(self, layer_prefix: str, expert: int) -> bool:
        return self.get_submodule(layer_prefix + ".mlp").holds(expert)

    def _expert_tensors(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """HF/GGUF names -> ember's (`<layer>.mlp.experts.<e>.{gate,up,down}_proj.weight`), stacked tensors split
        per expert, other ranks' experts dropped."""
        for name, tensor in weights:
            name = name.replace(".block_sparse_moe.", ".mlp.")
            m = _EXPERT.match(name)
            if m:
                layer, expert, part, param = m.group(1), int(m.group(2)), m.group(3), m.group(4)
                if self._holds(layer, expert):
                    yield f"{layer}.mlp.experts.{expert}.{_PARTS.get(part, part)}.{param}", tensor
                continue
            m = _STACKED.match(name)
            if m:
                layer, part = m.group(1), m.group(2)
                for expert in range(tensor.shape[0]):
                    if not self._holds(layer, expert):
                        continue
                    t = tensor[expert]
                    if part == "gate_up_proj":  # [2I, H]: gate rows, then up
                        gate, up = t.chunk(2, dim=0)
                        yield f"{layer}.mlp.experts.{expert}.gate_proj.weight", gate
                        yield f"{layer}.mlp.experts.{expert}.up_proj.weight", up
                    else:
                        yield f"{layer}.mlp.experts.{expert}.{part}.weight", t
                continue
            yield name, tensor

    def apply_quantization(self, quantization: dict) -> None:
        held = {path: spec for path, spec in quantization.get("layers", {}).items()
                if not (m := _EXPERT.match(path + ".weight")) or self._holds(m.group(1), int(m.group(2)))}
        super().apply_quantization({**quantization, "layers": held})

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._expert_tensors(weights))


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
