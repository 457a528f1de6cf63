"""The engine's one config. Pydantic models of Baseten's Engine-Builder-LLM YAML (a Truss config.yaml:
`model_name`, `resources`, `trt_llm: {build, runtime}`) plus ember's own top-level `ember:` section.

`load_config` builds an `EngineConfig` once (from a YAML file, a dict, a model/engine directory, a .gguf
file or nothing) and validates it once; the result is passed explicitly to constructors. Values derived
at run time (number of KV blocks, eos ids, the resolved checkpoint path) live elsewhere. Nothing here
reads environment variables or imports torch.

Every user error is a `ConfigError` with one line that names the dotted field, the bad value and what is
allowed, e.g. `trt_llm.build.quantization_type: 'fp7' is not one of no_quant, fp8, ...`.
"""

from __future__ import annotations

from ember.config.loading import load_config, parse_config
from ember.config.schema import (
    DEFAULT_MODEL_ID,
    QUANTIZATION_TYPES,
    BuildConfig,
    CheckpointRepository,
    EmberSection,
    EngineConfig,
    LimitsConfig,
    LoraConfiguration,
    PluginConfiguration,
    QuantizationConfig,
    Resources,
    RuntimeConfig,
    SpeculatorConfig,
    TrtLlmConfig,
)
from ember.errors import ConfigError

__all__ = [
    "ConfigError",
    "EngineConfig",
    "TrtLlmConfig",
    "BuildConfig",
    "RuntimeConfig",
    "EmberSection",
    "LimitsConfig",
    "CheckpointRepository",
    "SpeculatorConfig",
    "QuantizationConfig",
    "PluginConfiguration",
    "LoraConfiguration",
    "Resources",
    "load_config",
    "parse_config",
    "DEFAULT_MODEL_ID",
    "QUANTIZATION_TYPES",
]
