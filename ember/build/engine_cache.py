"""The local engine cache: `ember serve CONFIG` and `LLM(CONFIG)` serve what the config asks for.

A config whose `trt_llm.build` asks for something only `ember build` does (a `quantization_type` other than
no_quant: quantized weights, calibrated activation and KV-cache scales) is built once into `<cache>/<key>/`
and served from there. Everything else a build section says (max_seq_len, max_batch_size, speculator, LoRA,
tensor parallelism...) is applied at start-up and needs no build.

key: sha256 of what changes the artifact and nothing else: quantization_type, quantization_config (and the
calibration file's identity when it is a local file), the int4 group size, the resolved dtype and device type,
the engine format version, ember's version, and the checkpoint's identity (its resolved path and the name, size
and mtime of each of its files). The same config on the same checkpoint reuses the engine; a changed
quantization, dtype or checkpoint file gets a new key and is built.

The build takes a file lock per key (concurrent starts build once; the others wait and reuse it) and writes
under a temporary name renamed into place when complete (ember.build.builder), so a killed build is never
reused. Clearing the cache is deleting the directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/ember/engines"  # ember.engine_cache_dir / `--engine-cache-dir` override it
INT4_GROUP_SIZE = 128  # what `ember build` uses unless --int4-group-size says otherwise


def needs_build(cfg) -> bool:
    """Whether serving `cfg` needs an engine only a build makes (today: any quantization)."""
    build = cfg.trt_llm.build
    return build.base_model == "decoder" and build.quantization_type != "no_quant"


def cache_root(cfg) -> Path:
    return Path(cfg.ember.engine_cache_dir or DEFAULT_CACHE_DIR).expanduser().absolute()


def _file_identity(path: Path) -> list:
    st = path.stat()  # follows symlinks: an HF snapshot's files point at their blobs
    return [path.name, st.st_size, st.st_mtime_ns]


def checkpoint_identity(source: Path) -> dict:
    """The resolved path and (name, size, mtime) of its files: cheap, and any rewrite of a file changes it."""
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
    return {"path": str(source), "files": [_file_identity(p) for p in files]}


def engine_key(cfg, source: Path, device_type: str, dtype_name: str) -> tuple[str, dict]:
    """(hex key, the inputs it hashes) for building `cfg` from the checkpoint at `source`."""
    from ember import __version__
    from ember.build.engine_dir import FORMAT_VERSION

    build = cfg.trt_llm.build
    qcfg = build.quantization_config.model_dump(mode="json")
    calib = qcfg.get("calib_dataset")
    if calib and Path(calib).expanduser().is_file():
        qcfg["calib_dataset_file"] = _file_identity(Path(calib).expanduser().absolute())
    inputs = {"quantization_type": build.quantization_type, "quantization_config": qcfg,
              "int4_group_size": INT4_GROUP_SIZE, "dtype": dtype_name, "device": device_type,
              "format_version": FORMAT_VERSION, "ember": __version__, "checkpoint": checkpoint_identity(source)}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return digest[:32], inputs


@contextmanager
def _locked(path: Path):
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _complete(engine: Path) -> bool:
    """A finished engine: its manifest reads and every file it lists has its recorded size (load_engine then
    checks the checksums)."""
    from ember.build.engine_dir import EngineFormatError, read_manifest

    try:
        manifest = read_manifest(engine)
    except EngineFormatError:
        return False
    return all((engine / name).is_file() and (engine / name).stat().st_size == entry.get("bytes")
               for name, entry in manifest.get("files", {}).items())


def resolve_engine(cfg, log=logger.info):
    """`cfg` itself when it needs no build (or already names an engine directory); else the config of the cached
    engine for it, built first when absent: checkpoint_repository -> the engine directory, the served name kept."""
    if not needs_build(cfg):
        return cfg
    from ember.build.builder import build_engine
    from ember.build.engine_dir import is_engine_dir
    from ember.checkpoint import resolve_checkpoint_path
    from ember.config import load_config
    from ember.worker.device import resolve_device, resolve_dtype

    build = cfg.trt_llm.build
    source = resolve_checkpoint_path(build.checkpoint_repository)
    if is_engine_dir(source):
        return cfg
    device = resolve_device(cfg.ember.device)
    dtype = str(resolve_dtype(cfg.ember.dtype, device)).replace("torch.", "")
    key, _ = engine_key(cfg, Path(source), device.type, dtype)
    root = cache_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    engine = root / key
    with _locked(root / f"{key}.lock"):
        if _complete(engine):
            log(f"engine cache: reusing the {build.quantization_type} engine {engine} (built from {source})")
        else:
            if engine.exists():  # damaged by hand: this directory is ours, keyed, and rebuilt whole
                shutil.rmtree(engine)
            log(f"engine cache: building a {build.quantization_type} engine of {source} into {engine}; later "
                "starts with this build section and checkpoint reuse it")
            build_engine(cfg, engine, int4_group_size=INT4_GROUP_SIZE, progress=sys.stderr.isatty(), log=log)
            _release_build_memory(device)
    repo = {"source": "LOCAL", "repo": str(engine)}
    return load_config(cfg, checkpoint_repository=repo, served_model_name=cfg.served_model_id)


def _release_build_memory(device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
