"""Weight quantization formats and what each `build.quantization_type` means.

Each format is one `QuantizedMethod` class in its own file (the `Linear` quant seam: create_weights /
process_weights_after_loading / apply, plus `quantize` for the build). Adding one: a file and a line in
`QUANT_METHODS`; a new quantization_type is a line in `QUANT_SCHEMES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.layers.quant.base import QuantizedMethod
from ember.layers.quant.fp4 import Fp4Method
from ember.layers.quant.fp8 import Fp8Method
from ember.layers.quant.int4 import Int4Method
from ember.layers.quant.int8 import Int8Method

QUANT_METHODS: dict[str, type[QuantizedMethod]] = {
    "fp8": Fp8Method,
    "int8": Int8Method,
    "int4": Int4Method,
    "fp4": Fp4Method,
}


@dataclass(frozen=True)
class QuantScheme:
    """A quantization_type: the weight format of the Linears it covers, and the KV cache dtype."""

    weight_format: str | None  # a QUANT_METHODS key; None: weights stay in the model dtype
    kv_cache_dtype: torch.dtype | None = None  # None: the model dtype
    is_mlp_only: bool = False  # True: only the MLP projections are quantized

    def covers(self, layer_path: str) -> bool:
        """Whether the Linear at `layer_path` is quantized. The output head never is (logits stay precise), nor a
        mixture-of-experts router (`.mlp.gate`: a rounded score can send a token to another expert)."""
        if self.weight_format is None or layer_path == "lm_head" or layer_path.endswith((".lm_head", ".mlp.gate")):
            return False
        return ".mlp." in f".{layer_path}." if self.is_mlp_only else True


QUANT_SCHEMES: dict[str, QuantScheme] = {
    "no_quant": QuantScheme(None),
    "fp8": QuantScheme("fp8"),
    "fp8_kv": QuantScheme("fp8", kv_cache_dtype=torch.float8_e4m3fn),
    "int8": QuantScheme("int8"),
    "int4": QuantScheme("int4"),
    "fp4": QuantScheme("fp4"),
    "fp4_kv": QuantScheme("fp4", kv_cache_dtype=torch.float8_e4m3fn),
    "fp4_mlp_only": QuantScheme("fp4", is_mlp_only=True),
}


def make_quant_method(spec: dict) -> QuantizedMethod:
    """A method from its manifest entry: {"method": "int4", "group_size": 64}."""
    params = {k: v for k, v in spec.items() if k != "method"}
    try:
        cls = QUANT_METHODS[spec["method"]]
    except KeyError:
        raise ValueError(f"unknown weight format {spec.get('method')!r}; known: {', '.join(QUANT_METHODS)}") from None
    return cls(**params)


__all__ = ["QUANT_METHODS", "QUANT_SCHEMES", "QuantScheme", "QuantizedMethod", "make_quant_method"]
