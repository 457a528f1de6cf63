"""The engine directory: what `ember build` writes and `ember serve DIR` / `LLM(DIR)` loads.

    manifest.json         format, architecture, quantization (per-layer formats, KV cache dtype), tokenizer,
                          chat template, build provenance, the quality/size report, and every file's size
                          and sha256
    config.json           the transformers config of the architecture
    model*.safetensors    every tensor under ember's module names, quantized ones as stored by their
                          format (e.g. `...qkv_proj.weight` int8 + `...qkv_proj.weight_scale` float32)
    tokenizer files       as `save_pretrained` writes them

Loading checks every listed file's size and checksum first, so a truncated or corrupted engine fails
with a message naming the file, before any weight is read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ember.checkpoint.loader import Checkpoint

MANIFEST = "manifest.json"
FORMAT = "ember-engine"
FORMAT_VERSION = 2  # 2: int4 stores (scale, min) per group as [out, G] (GGUF's grid); 1 stored (scale, zero) [G, out, 2]
READABLE_VERSIONS = (1, 2)  # a version-1 engine loads unless it holds int4 layers
MAX_SHARD_BYTES = 2 << 30


class EngineFormatError(ValueError):
    """An engine directory that cannot be loaded (missing, truncated or corrupted files, unknown format)."""


def is_engine_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entries(root: Path, names: list[str]) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} for the manifest."""
    return {name: {"bytes": (root / name).stat().st_size, "sha256": sha256_file(root / name)} for name in sorted(names)}


def write_weights(root: Path, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Save tensors as safetensors shards of at most MAX_SHARD_BYTES; returns the file names."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().cpu().contiguous()
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        save_file(shard, str(root / name), metadata={"format": "pt", "producer": FORMAT})
    return names


def read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not file.is_file():
        raise EngineFormatError(f"{path} is not an engine directory: it has no {MANIFEST}")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineFormatError(f"engine {path}: {MANIFEST} is corrupted or truncated ({e}); rebuild it with "
                                "`ember build`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EngineFormatError(f"engine {path}: {MANIFEST} is not an ember engine manifest (format is not {FORMAT!r})")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise EngineFormatError(f"engine {path}: format_version {version!r} is not supported by this ember (it reads "
                                f"versions {', '.join(map(str, READABLE_VERSIONS))}); rebuild the engine")
    layers = (manifest.get("quantization") or {}).get("layers") or {}
    if version == 1 and any(spec.get("method") == "int4" for spec in layers.values()):
        raise EngineFormatError(f"engine {path}: an int4 engine of format_version 1 stores its weights in a layout "
                                "this ember no longer reads (int4 now keeps a GGUF's 4-bit grid exactly); rebuild it "
                                "with `ember build`")
    return manifest


def verify_files(path: Path, manifest: dict) -> None:
    """Every file the manifest lists exists with its recorded size and sha256."""
    for name, entry in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise EngineFormatError(f"engine {path}: file {name} is missing; rebuild the engine with `ember build`")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise EngineFormatError(f"engine {path}: file {name} is truncated or altered: {size} bytes on disk, "
                                    f"{entry['bytes']} when built; rebuild the engine with `ember build`")
        if sha256_file(file) != entry["sha256"]:
            raise EngineFormatError(f"engine {path}: file {name} is corrupted (sha256 differs from the manifest); "
                                    "rebuild the engine with `ember build`")


@dataclass
class EngineCheckpoint(Checkpoint):
    """A built engine opened as a checkpoint: weights under ember's names, quantization on `hf_config`
    (`ember_quantization`), which the model reads to give its Linears their formats before loading."""

    manifest: dict = field(default_factory=dict, repr=False)

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        for name in self.manifest["weights"]:
            with safe_open(self.path / name, framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path, local_files_only=True)


def load_engine(path: str | Path) -> EngineCheckpoint:
    """Open an engine directory: manifest, file checks, config. Weights stay on disk until iter_weights()."""
    from transformers import AutoConfig

    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    hf_config.ember_quantization = manifest["quantization"]
    tok = manifest.get("tokenizer", {})
    return EngineCheckpoint(
        path=path,
        format="engine",
        architecture=manifest["architecture"],
        hf_config=hf_config,
        chat_template=manifest.get("chat_template"),
        eos_token_ids=list(tok.get("eos_token_ids", [])),
        bos_token_id=tok.get("bos_token_id"),
        max_position_embeddings=manifest.get("max_position_embeddings"),
        sampling_defaults=dict(manifest.get("sampling_defaults") or {}),
        manifest=manifest,
    )
