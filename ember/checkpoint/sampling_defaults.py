"""A model's own sampling defaults: what its publisher recommends for the fields a request leaves out.

Read from a checkpoint's generation_config.json (transformers' file; vLLM applies it the same way by default) or a
GGUF's `general.sampling.*` keys, and carried into a built engine's manifest. The server overlays
`ember.sampling_defaults` from the config on top, and only a request field left out (or sent as null) takes them.
"""

from __future__ import annotations

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
              "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
              "general.sampling.penalty_repeat": "repetition_penalty"}


def _clean(values: dict) -> dict:
    out = {}
    for key in SAMPLING_KEYS:
        value = values.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[key] = int(value) if key == "top_k" else float(value)
    if out.get("top_k") == 0:  # transformers' "no top-k" is 0; ours is -1
        out["top_k"] = -1
    return out


def from_generation_config(generation: dict) -> dict:
    """generation_config.json's sampling fields (transformers' names) -> {field: value}."""
    return _clean(generation)


def from_gguf_metadata(metadata: dict) -> dict:
    """A GGUF's general.sampling.* keys -> {field: value}."""
    return _clean({name: metadata[key] for key, name in _GGUF_KEYS.items() if key in metadata})


def merge(model_defaults: dict, configured) -> dict:
    """The model's defaults overlaid with the config's `ember.sampling_defaults` (its set fields win)."""
    out = dict(model_defaults)
    if configured is not None:
        out.update({k: v for k, v in configured.model_dump().items() if v is not None})
    return out
