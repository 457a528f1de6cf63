"""A checkpoint on disk, opened: its architecture, transformers config, tokenizer and a lazy weight stream.

Two formats are read: a directory of safetensors (+ config.json, tokenizer files) and a single GGUF file.
Pickled weights (pytorch_model.bin) are never loaded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ember.checkpoint.gguf_meta import gguf_eos_token_ids, gguf_hf_config, gguf_tokenizer
from ember.checkpoint.gguf_reader import GGUFFile, read_gguf
from ember.checkpoint.gguf_weights import gguf_architecture, iter_gguf_weights
from ember.checkpoint.sampling_defaults import from_gguf_metadata, from_generation_config

if TYPE_CHECKING:
    from ember.checkpoint.gguf_grid import Int4Grid

logger = logging.getLogger(__name__)
# vision-language architectures whose text model ember serves (the config's text_config describes it)
_TEXT_OF_MULTIMODAL = ("Gemma3ForConditionalGeneration",)


@dataclass
class Checkpoint:
    """Everything the engine needs from a checkpoint; weights stay on disk until iter_weights()."""

    path: Path  # the directory, or the .gguf file
    format: str  # "safetensors" | "gguf"
    architecture: str  # transformers class name, e.g. "LlamaForCausalLM"
    hf_config: object  # transformers.PretrainedConfig
    chat_template: str | None  # Jinja source, None when the checkpoint ships none
    eos_token_ids: list[int]  # every id that ends generation
    bos_token_id: int | None
    max_position_embeddings: int | None
    _gguf: GGUFFile | None = field(default=None, repr=False)  # the parsed header, GGUF only
    # the publisher's sampling defaults (ember.checkpoint.sampling_defaults): temperature, top_p, ... when given
    sampling_defaults: dict = field(default_factory=dict)

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (hf_name, tensor) one at a time: safetensors in their stored dtype, GGUF as float32."""
        if self._gguf is not None:
            return iter_gguf_weights(self._gguf, self.hf_config)
        return _iter_safetensors(self.path)

    def iter_int4_grids(self) -> Iterator[tuple[str, "Int4Grid"]]:
        """Yield (hf_name, grid) for each weight the file stores on a 4-bit grid (GGUF Q4_0/Q4_1/Q4_K), so a
        4-bit build can keep it exactly; nothing for other formats."""
        if self._gguf is None:
            return iter(())
        from ember.checkpoint.gguf_grid import iter_gguf_int4_grids

        return iter_gguf_int4_grids(self._gguf, self.hf_config)

    def load_tokenizer(self):
        """The checkpoint's tokenizer as a transformers PreTrainedTokenizerFast (never from the hub)."""
        if self._gguf is not None:
            return gguf_tokenizer(self._gguf)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path, local_files_only=True)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint directory, .gguf file or engine directory; reads metadata only, no weights."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path)
    if path.is_dir() and (path / "manifest.json").is_file():  # an engine directory written by `ember build`
        from ember.build.engine_dir import load_engine

        return load_engine(path)
    if path.is_dir():
        return _load_dir(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist.")
    raise ValueError(f"checkpoint {path} is neither a directory nor a .gguf file.")


def _load_gguf(path: Path) -> Checkpoint:
    gguf = read_gguf(path)
    architecture = gguf_architecture(gguf)
    hf_config = gguf_hf_config(gguf, architecture)
    bos = gguf.metadata.get("tokenizer.ggml.bos_token_id")
    return Checkpoint(
        path=path,
        format="gguf",
        architecture=architecture,
        hf_config=hf_config,
        chat_template=gguf.metadata.get("tokenizer.chat_template"),
        eos_token_ids=gguf_eos_token_ids(gguf) or _as_ids(getattr(hf_config, "eos_token_id", None)),
        bos_token_id=int(bos) if bos is not None else None,
        max_position_embeddings=getattr(hf_config, "max_position_embeddings", None),
        _gguf=gguf,
        sampling_defaults=from_gguf_metadata(gguf.metadata),
    )


def _load_dir(path: Path) -> Checkpoint:
    if not (path / "config.json").is_file():
        raise ValueError(f"checkpoint directory {path} has no config.json.")
    if not _safetensors_files(path):
        if any(path.glob("pytorch_model*.bin")) or any(path.glob("*.pt")):
            raise ValueError(
                f"checkpoint directory {path} holds only pickled weights (pytorch_model.bin); ember loads only "
                "safetensors and GGUF. Convert it to safetensors first."
            )
        raise ValueError(f"checkpoint directory {path} has no *.safetensors weights.")
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    architectures = getattr(hf_config, "architectures", None) or []
    if not architectures:
        raise ValueError(f"{path / 'config.json'} names no `architectures`, so the model class is unknown.")
    eos_ids = _as_ids(getattr(hf_config, "eos_token_id", None))
    if architectures[0] in _TEXT_OF_MULTIMODAL:  # ember serves the language model: its config is the model's
        logger.info("%s: vision tower ignored; serving the language model only", architectures[0])
        hf_config = hf_config.get_text_config()
        hf_config.architectures = architectures
    generation = _read_json(path / "generation_config.json")
    eos_ids = list(dict.fromkeys(eos_ids + _as_ids(generation.get("eos_token_id"))))
    bos = getattr(hf_config, "bos_token_id", None)
    if bos is None:
        bos = generation.get("bos_token_id")
    return Checkpoint(
        path=path,
        format="safetensors",
        architecture=architectures[0],
        hf_config=hf_config,
        chat_template=_dir_chat_template(path),
        eos_token_ids=eos_ids,
        bos_token_id=bos,
        max_position_embeddings=getattr(hf_config, "max_position_embeddings", None),
        sampling_defaults=from_generation_config(generation),
    )


def _safetensors_files(path: Path) -> list[Path]:
    """Shards in index order when there is an index, else every *.safetensors file, sorted."""
    index = _read_json(path / "model.safetensors.index.json")
    if index:
        return [path / name for name in dict.fromkeys(index["weight_map"].values())]
    return sorted(path.glob("*.safetensors"))


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for shard in _safetensors_files(path):
        with safe_open(shard, framework="pt") as f:  # memory-mapped; one tensor materialized at a time
            for name in f.keys():
                yield name, f.get_tensor(name)


def _dir_chat_template(path: Path) -> str | None:
    """tokenizer_config.json's chat_template (the "default" one if named), else chat_template.jinja/.json."""
    template = _read_json(path / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        by_name = {item.get("name"): item.get("template") for item in template}
        template = by_name.get("default", next(iter(by_name.values()), None))
    if template:
        return template
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    return _read_json(path / "chat_template.json").get("chat_template")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
