"""What every ember causal LM shares: the KV-cache shape, logits, and checkpoint loading by HF tensor name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ember.distributed.parallel import SINGLE, ParallelContext
from ember.layers import cpu_kernels
from ember.layers.linear import Linear


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of a model's paged KV cache; the runner allocates `num_layers` tensors from it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


def layer_sliding_window(hf_config, layer_idx: int) -> int | None:
    """The sliding window of one layer: `layer_types` decides where present, else `sliding_window` applies to all."""
    window = getattr(hf_config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window


def head_dim_of(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


class CausalLM(nn.Module):
    """Base of the model classes. Subclasses build `self.model` (embed_tokens, layers, norm) and `self.lm_head`
    (None when tied), name their modules like the HF checkpoint, and list fused tensors in `stacked_params`."""

    # (checkpoint name part, our name part, shard id): separate HF tensors loaded into row slices of one Linear.
    stacked_params: list[tuple[str, str, int]] = [
        (".q_proj.", ".qkv_proj.", 0),
        (".k_proj.", ".qkv_proj.", 1),
        (".v_proj.", ".qkv_proj.", 2),
        (".gate_proj.", ".gate_up_proj.", 0),
        (".up_proj.", ".gate_up_proj.", 1),
    ]
    # (checkpoint name part, our name part): plain renames.
    renamed_params: list[tuple[str, str]] = []

    num_layers: int
    num_kv_heads: int
    head_dim: int
    final_logit_softcap: float | None = None
    kv_cache_dtype: torch.dtype | None = None  # None: the model dtype; set by an engine's quantization
    parallel: ParallelContext = SINGLE  # the tensor-parallel rank this instance is built for

    def _init_shape(self, hf_config, dtype: torch.dtype, device, parallel: ParallelContext) -> torch.device:
        """The attributes every model sets from its config: this rank's layer count, KV heads and head size."""
        device = torch.device(device)
        self.config, self.dtype, self.device, self.parallel = hf_config, dtype, device, parallel
        self.num_layers = hf_config.num_hidden_layers
        num_kv = hf_config.num_key_value_heads or hf_config.num_attention_heads
        self.num_kv_heads = parallel.shard_heads(hf_config.num_attention_heads, num_kv)[1][1]
        self.head_dim = head_dim_of(hf_config)
        return device

    def sliding_window_layers(self) -> tuple[int, list[int]] | None:
        """(window, layer indices) of sliding-window layers that can keep only their window in a KV pool of their
        own (ember.core.window_blocks), beside global layers; None: every layer shares one block table. A model
        opts in by overriding this (its forward must give those layers `attn_metadata.window`)."""
        return None

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(self.num_layers, self.num_kv_heads, self.head_dim)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [N, H] -> logits [N, V] float32. Tensor-parallel: rank 0 gets the whole vocabulary, others None."""
        if self.lm_head is None:
            logits = cpu_kernels.linear(hidden, self.model.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden)
        if self.parallel.is_parallel:  # each rank holds a slice of the vocabulary
            logits = self.parallel.gather_first(logits, dim=-1)  # [N, V (+ padding)] on rank 0
            if logits is None:
                return None
            logits = logits[:, : self.config.vocab_size]
        logits = logits.float()
        if self.final_logit_softcap:
            logits = torch.tanh(logits / self.final_logit_softcap) * self.final_logit_softcap
        return logits

    def _map_name(self, hf_name: str) -> tuple[str, int | None]:
        for src, dst, shard in self.stacked_params:
            if src in hf_name:
                return hf_name.replace(src, dst), shard
        for src, dst in self.renamed_params:
            if src in hf_name:
                return hf_name.replace(src, dst), None
        return hf_name, None

    def _expected_loads(self) -> set[tuple[str, str, int | None]]:
        expected = set()
        for path, module in self.named_modules():
            if not hasattr(module, "load_weight"):
                continue
            if isinstance(module, Linear):
                shards = [None] if module.num_shards == 1 else list(range(module.num_shards))
                for pname in ("weight", "bias") if module.bias is not None else ("weight",):
                    expected.update((path, pname, s) for s in shards)
            else:
                expected.update((path, pname, None) for pname, _ in module.named_parameters(recurse=False))
        return expected

    def apply_quantization(self, quantization: dict) -> None:
        """Give each Linear the weight format an engine manifest names for it, and the attention layers their
        KV-cache scales, before the engine's (already quantized) tensors are loaded.

        quantization: the manifest's {"layers": {linear path: {"method": ..., params}}, "kv_cache_dtype": name
        or None, "kv_cache_scales": [attention paths]}.
        """
        from ember.layers.quant import make_quant_method

        for path, spec in quantization.get("layers", {}).items():
            layer = self.get_submodule(path)
            if not isinstance(layer, Linear):
                raise ValueError(f"engine quantizes {path}, which is not a linear layer of {type(self).__name__}")
            layer.set_quant_method(make_quant_method(spec), self.dtype, self.device)
        if quantization.get("kv_cache_dtype"):
            self.kv_cache_dtype = getattr(torch, quantization["kv_cache_dtype"])
            for path in quantization.get("kv_cache_scales", []):
                # [2] float32: K and V scales, cache value * scale = true value
                scale = torch.ones(2, dtype=torch.float32, device=self.device)
                self.get_submodule(path).register_parameter("kv_scale", nn.Parameter(scale, requires_grad=False))

    @torch.no_grad()
    def load_engine_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load an engine directory's tensors: ember's own names, quantized tensors in their stored dtypes
        (copied as they are), the rest cast to the model dtype. Raises naming unexpected/missing ones."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            param = params.get(name)
            if param is None:
                raise ValueError(f"{type(self).__name__}: engine tensor {name} matches no parameter of the model")
            if self.parallel.is_parallel:  # engines store whole tensors; keep this rank's slice
                path, _, pname = name.rpartition(".")
                module = self.get_submodule(path)
                if hasattr(module, "shard_tensor"):
                    tensor = module.shard_tensor(pname, tensor)
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(f"engine tensor {name}: expected shape {tuple(param.shape)}, found {tuple(tensor.shape)}")
            if param.dtype.is_floating_point != tensor.dtype.is_floating_point or (
                    param.dtype.itemsize == 1 and param.dtype != tensor.dtype):
                raise ValueError(f"engine tensor {name}: expected dtype {param.dtype}, found {tensor.dtype}")
            param.data.copy_(tensor)
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"{type(self).__name__}: tensors missing from engine: {', '.join(missing[:20])}"
                             + (f" (and {len(missing) - 20} more)" if len(missing) > 20 else ""))
        for module in self.modules():
            if isinstance(module, Linear):
                module.process_weights_after_loading()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors (any float dtype; cast to the model dtype). Raises naming unexpected/missing ones.

        An engine directory's checkpoint carries its quantization on the config (`ember_quantization`): then
        the Linears get their formats first and the tensors load by ember's names, as stored."""
        quantization = getattr(self.config, "ember_quantization", None)
        if quantization is not None:
            self.apply_quantization(quantization)
            return self.load_engine_weights(weights)
        expected = self._expected_loads()
        loaded: set[tuple[str, str, int | None]] = set()
        unexpected: list[str] = []
        for hf_name, tensor in weights:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue  # old checkpoints store the rotary table; ours is computed
            if self.lm_head is None and hf_name == "lm_head.weight":
                continue  # tied embeddings: the head is the embedding table
            name, shard = self._map_name(hf_name)
            path, _, pname = name.rpartition(".")
            key = (path, pname, shard)
            module = self.get_submodule(path) if (path, pname, shard) in expected or (
                shard is None and (path, pname, 0) in expected) else None
            if module is None:
                unexpected.append(hf_name)
                continue
            try:
                module.load_weight(pname, tensor, shard)
            except ValueError as e:
                raise ValueError(f"checkpoint tensor {hf_name}: {e}") from None
            if shard is None and isinstance(module, Linear) and module.num_shards > 1:
                loaded.update((path, pname, s) for s in range(module.num_shards))  # already-fused tensor
            else:
                loaded.add(key)
        if unexpected:
            raise ValueError(
                f"{type(self).__name__}: unexpected tensors in checkpoint: {', '.join(sorted(unexpected)[:20])}"
                + (f" (and {len(unexpected) - 20} more)" if len(unexpected) > 20 else "")
            )
        missing = expected - loaded
        if missing:
            names = sorted(f"{p}.{n}" + ("" if s is None else f"[shard {s}]") for p, n, s in missing)
            raise ValueError(
                f"{type(self).__name__}: tensors missing from checkpoint: {', '.join(names[:20])}"
                + (f" (and {len(names) - 20} more)" if len(names) > 20 else "")
            )
        for module in self.modules():
            if isinstance(module, Linear):
                module.process_weights_after_loading()
