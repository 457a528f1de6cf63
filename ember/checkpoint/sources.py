"""Where a checkpoint lives: a local directory or .gguf, the local Hugging Face cache, or the default model.

Only local files are ever read; the network is never touched (an HF repo must already be cached).
"""

from __future__ import annotations

from pathlib import Path

from ember.checkpoint.default import default_model_path

SUPPORTED_SOURCES = ("HF", "LOCAL")


def resolve_checkpoint_path(
    source="HF", repo: str | None = None, revision: str | None = None, *, cache_dir: str | Path | None = None
) -> Path:
    """Path of the checkpoint to load: a directory (config.json + safetensors) or a .gguf file.

    `source` is "HF" or "LOCAL" (an enum with such a `.value` works too), or a config object carrying
    the checkpoint repository: `cfg.trt_llm.build.checkpoint_repository` or that object itself
    (`.source`, `.repo`, `.revision`). `repo` None means the default model.
    """
    if not isinstance(source, str) and not hasattr(source, "value"):
        source, repo, revision = _from_config(source)
    source_name = str(getattr(source, "value", source) or "HF").upper()
    if source_name not in SUPPORTED_SOURCES:
        raise ValueError(
            f"checkpoint_repository.source {source_name} is not supported here; "
            f"use one of {', '.join(SUPPORTED_SOURCES)} (no network access)."
        )
    if repo is None:
        return default_model_path()
    if source_name == "LOCAL":
        return _local(Path(repo).expanduser())
    return _from_hf_cache(repo, revision, cache_dir)


def _from_config(cfg):
    build = getattr(getattr(cfg, "trt_llm", None), "build", None)
    repository = getattr(build, "checkpoint_repository", cfg) if build is not None else cfg
    if repository is None:
        return "HF", None, None
    return getattr(repository, "source", "HF"), getattr(repository, "repo", None), getattr(repository, "revision", None)


def _local(path: Path) -> Path:
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"checkpoint_repository.repo {path} is a file but not a .gguf; give a .gguf file or a directory "
                "with config.json and *.safetensors."
            )
        return path
    if path.is_dir():
        return _checkpoint_in_dir(path)
    raise FileNotFoundError(f"checkpoint_repository.repo {path} does not exist.")


def _checkpoint_in_dir(path: Path) -> Path:
    """A directory with config.json is the checkpoint; without one, a lone .gguf inside it is."""
    if (path / "config.json").is_file():
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise ValueError(f"checkpoint_repository.repo {path} holds several .gguf files ({names}); name one of them.")
    raise ValueError(f"checkpoint_repository.repo {path} has no config.json and no .gguf file.")


def _from_hf_cache(repo: str, revision: str | None, cache_dir) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = snapshot_download(repo, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as exc:
        where = f"@{revision}" if revision else ""
        raise FileNotFoundError(
            f"checkpoint_repository.repo {repo}{where} is not in the local Hugging Face cache and there is "
            f"no network here; download it elsewhere into the cache, or use source: LOCAL. ({exc.__class__.__name__})"
        ) from None
    return _checkpoint_in_dir(Path(snapshot))
