"""`ember build`: one config in, an engine directory out.

resolve the checkpoint -> load the unquantized model -> calibrate (activation and KV scales) -> quantize
each covered Linear with its format -> write the engine directory -> load it back through the normal
engine path -> compare it with the unquantized model on held-out text -> save the report in the manifest.
The directory is written under a temporary name and renamed into place only when complete.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ember.build.calib_data import HELD_OUT_SET
from ember.build.calibration import BuildError, calibrate, load_texts, tokenize_samples
from ember.build.gptq import collect_hessians, gptq_quantize
from ember.build.int4_sources import lossless_int4_layers
from ember.build.engine_dir import (FORMAT, FORMAT_VERSION, MANIFEST, EngineCheckpoint, file_entries,
                                    is_engine_dir, load_engine, write_weights)
from ember.build.quality import compare_models, format_report
from ember.checkpoint import load_checkpoint, resolve_checkpoint_path
from ember.layers.cpu_pack import pack_model_for_cpu
from ember.layers.linear import Linear
from ember.layers.quant import QUANT_SCHEMES, QuantizedMethod, make_quant_method
from ember.layers.quant.fp8 import FP8_MAX
from ember.layers.quant.int4 import Int4Method
from ember.models.registry import get_model_class
from ember.worker.device import resolve_device, resolve_dtype

logger = logging.getLogger(__name__)
QTYPE_FIELD = "trt_llm.build.quantization_type"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("ember", "torch", "transformers", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def plan_layers(model, quantization_type: str, int4_group_size: int = 128) -> dict[str, QuantizedMethod]:
    """Linear path -> the format it gets under `quantization_type`. Refuses layers with a bias the format cannot take."""
    scheme = QUANT_SCHEMES[quantization_type]
    plan = {}
    for path, module in model.named_modules():
        if not isinstance(module, Linear) or not scheme.covers(path):
            continue
        spec = {"method": scheme.weight_format}
        if scheme.weight_format == "int4":
            from ember.layers.quant.base import pick_group_size

            spec["group_size"] = pick_group_size(module.in_features, int4_group_size)
        method = make_quant_method(spec)
        if module.bias is not None and not method.supports_bias:
            raise BuildError(
                f"{QTYPE_FIELD}: {quantization_type!r} cannot quantize this {type(model).__name__}: layer {path} has "
                f"a bias, which {method.name}'s block-scaled GEMM cannot take; use fp8, int8 or int4, or no_quant")
        plan[path] = method
    return plan


def attention_paths(model) -> list[str]:
    """The attention module of each layer, in layer order (one per KV cache)."""
    paths = [path for path, m in model.named_modules() if hasattr(m, "backend") and hasattr(m, "qkv_proj")]
    if len(paths) != model.num_layers:
        raise BuildError(f"{QTYPE_FIELD}: found {len(paths)} attention modules for {model.num_layers} layers")
    return paths


def _load_model(checkpoint, dtype, device):
    with torch.device(device):
        model = get_model_class(checkpoint.architecture)(checkpoint.hf_config, dtype=dtype, device=device)
    model.load_weights(checkpoint.iter_weights())
    return model.eval()


def build_engine(cfg, output_dir: str | Path, *, int4_group_size: int = 128, num_eval_prompts: int = 8,
                 eval_max_seq_length: int = 256, progress: bool = True, log=print) -> Path:
    """Build the engine `cfg` describes into `output_dir` (replaced if it is an older engine) and return its path.
    Prints what each format computes with on this host, and the quality and size report at the end."""
    build, em = cfg.trt_llm.build, cfg.ember
    qtype, qcfg = build.quantization_type, build.quantization_config
    scheme = QUANT_SCHEMES[qtype]
    out = Path(output_dir).expanduser().absolute()
    if out.exists() and not (out.is_dir() and (is_engine_dir(out) or not any(out.iterdir()))):
        raise BuildError(f"-o {out}: exists and is not an engine directory; choose a new or empty directory")
    t0 = time.perf_counter()
    source = resolve_checkpoint_path(build.checkpoint_repository)
    ckpt = load_checkpoint(source)
    if isinstance(ckpt, EngineCheckpoint):
        raise BuildError(f"trt_llm.build.checkpoint_repository: {source} is already a built engine; build from the "
                         "original checkpoint")
    device = resolve_device(em.device)
    dtype = resolve_dtype(em.dtype, device)
    if em.num_threads:
        torch.set_num_threads(em.num_threads)
    log(f"ember build: {ckpt.architecture} from {source} ({ckpt.format}), {qtype}, {_dtype_name(dtype)} on {device}")
    tokenizer = ckpt.load_tokenizer()
    model = _load_model(ckpt, dtype, device)
    plan = plan_layers(model, qtype, int4_group_size)
    attn = attention_paths(model)
    if scheme.kv_cache_dtype is not None:
        log(f"  KV cache: {_dtype_name(scheme.kv_cache_dtype)} with per-layer calibrated scales "
            "(dequantized when attention reads it)")
    if qtype == "fp8_kv" and ckpt.architecture == "Qwen2ForCausalLM":
        log("  warning: Qwen2's q/k/v bias makes it sensitive to an fp8 KV cache; plain fp8 usually keeps more quality")

    # ---- int4: Linears already on a 4-bit grid in the file keep it; the others are rounded with GPTQ
    lossless = lossless_int4_layers(model, ckpt, list(plan)) if scheme.weight_format == "int4" else {}
    for path, kept in lossless.items():
        plan[path] = kept.method
    gptq_paths = [p for p, m in plan.items() if isinstance(m, Int4Method) and p not in lossless]
    if scheme.weight_format == "int4":
        kinds = sorted({t for kept in lossless.values() for t in kept.source_types})
        log(f"  int4: {len(lossless)} of {len(plan)} layers keep the file's {'/'.join(kinds) or '4-bit'} grid "
            f"exactly (group 32); {len(gptq_paths)} are rounded with GPTQ over the calibration text")
    for note in dict.fromkeys(m.compute_note(device) for m in plan.values()):
        log(f"  {note}")

    # ---- calibration
    needs_inputs = [p for p, m in plan.items() if m.needs_activation_scale]
    calib = None
    hessians: dict[str, torch.Tensor] = {}
    if needs_inputs or scheme.kv_cache_dtype is not None or gptq_paths:
        max_len = min(qcfg.calib_max_seq_length, ckpt.max_position_embeddings or qcfg.calib_max_seq_length)
        samples = tokenize_samples(tokenizer, load_texts(qcfg.calib_dataset), qcfg.calib_size, max_len)
        if not samples:
            raise BuildError(f"trt_llm.build.quantization_config.calib_dataset: no sample has 2 or more tokens")
        if needs_inputs or scheme.kv_cache_dtype is not None:
            calib = calibrate(model, samples, needs_inputs, attn, progress=progress)
        if gptq_paths:
            hessians = collect_hessians(model, samples, gptq_paths, progress=progress)

    # ---- quantize: every tensor under ember's names, covered Linears in their format
    tensors: dict[str, torch.Tensor] = {}
    quantized_params = {f"{p}.weight" for p in plan}
    for name, param in model.named_parameters():
        if name not in quantized_params:
            tensors[name] = param.detach().to(dtype)
    layers_manifest = {}
    for path, method in tqdm(plan.items(), desc=f"quantizing ({qtype})", unit="layer", disable=not progress):
        layer = model.get_submodule(path)
        amax = calib.input_amax.get(path) if calib is not None else None
        if path in lossless:
            stored = lossless[path].tensors
        elif path in hessians:
            stored = gptq_quantize(method, layer.weight.detach(), hessians.pop(path))
        else:
            stored = method.quantize(layer.weight.detach(), input_amax=amax)
        for key, t in stored.items():
            tensors[f"{path}.{key}"] = t
        layers_manifest[path] = {"method": method.name, **method.params()}
    kv_scales = []
    if scheme.kv_cache_dtype is not None:
        fmax = torch.finfo(scheme.kv_cache_dtype).max
        for path in attn:
            k_amax, v_amax = calib.kv_amax[path]
            tensors[f"{path}.kv_scale"] = torch.tensor([max(k_amax, 1e-6) / fmax, max(v_amax, 1e-6) / fmax])
            kv_scales.append(path)
    quantization = {
        "type": qtype,
        "layers": layers_manifest,
        "kv_cache_dtype": _dtype_name(scheme.kv_cache_dtype) if scheme.kv_cache_dtype is not None else None,
        "kv_cache_scales": kv_scales,
        "compute": {m.name: m.compute_note(device) for m in plan.values()},
        "int4_grids": None if scheme.weight_format != "int4" else {
            "lossless": {p: kept.source_types for p, kept in lossless.items()}, "gptq": gptq_paths},
        "calibration": None if calib is None else {
            "dataset": qcfg.calib_dataset or "ember-mix", "calib_size": qcfg.calib_size,
            "calib_max_seq_length": qcfg.calib_max_seq_length,
            "num_samples": calib.num_samples, "num_tokens": calib.num_tokens},
    }

    # ---- write under a temporary name
    tmp = out.with_name(f".{out.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weight_files = write_weights(tmp, tensors)
        del tensors
        config = ckpt.hf_config
        if not getattr(config, "architectures", None):
            config.architectures = [ckpt.architecture]
        config.to_json_file(str(tmp / "config.json"))
        before = set(p.name for p in tmp.iterdir())
        tokenizer.save_pretrained(str(tmp))
        tokenizer_files = sorted(p.name for p in tmp.iterdir() if p.name not in before and p.is_file())
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": ckpt.architecture,
            "dtype": _dtype_name(dtype),
            "max_position_embeddings": ckpt.max_position_embeddings,
            "quantization": quantization,
            "weights": weight_files,
            "tokenizer": {"files": tokenizer_files, "eos_token_ids": list(ckpt.eos_token_ids),
                          "bos_token_id": ckpt.bos_token_id},
            "chat_template": ckpt.chat_template,
            "sampling_defaults": dict(ckpt.sampling_defaults),
            "build": {"source": {"path": str(source), "format": ckpt.format}, "config": cfg.normalized_dict(),
                      "versions": _versions(), "host": {"machine": platform.machine(), "device": str(device)},
                      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
            "files": file_entries(tmp, weight_files + ["config.json"] + tokenizer_files),
        }
        _write_manifest(tmp, manifest)

        # ---- load the engine back the way serving does, and measure it
        engine_ckpt = load_engine(tmp)
        engine = _load_model(engine_ckpt, dtype, device)
        pack_model_for_cpu(engine)  # as the serving runner does (CPU bf16: packed weights, an 8-bit LM head's grid)
        held_out = tokenize_samples(tokenizer, load_texts(HELD_OUT_SET), num_eval_prompts,
                                    min(eval_max_seq_length, ckpt.max_position_embeddings or eval_max_seq_length))
        quality = compare_models(model, engine, held_out, progress=progress)
        manifest["report"] = _report(qtype, model, engine, dtype, weight_files, tmp, quality, time.perf_counter() - t0)
        _write_manifest(tmp, manifest)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(format_report(manifest["report"]))
    return out


def _write_manifest(root: Path, manifest: dict) -> None:
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _report(qtype, model, engine, dtype, weight_files, root, quality, seconds) -> dict:
    unquantized = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    on_disk = sum((root / f).stat().st_size for f in weight_files)
    kv_dtype = engine.kv_cache_dtype or dtype
    per_token = 2 * model.num_layers * model.num_kv_heads * model.head_dim * kv_dtype.itemsize
    return {
        "quantization_type": qtype,
        "size": {"weights_bytes": on_disk, "unquantized_bytes": unquantized, "dtype": _dtype_name(dtype),
                 "compression": unquantized / on_disk},
        "quality": quality,
        "kv_cache": {"dtype": _dtype_name(kv_dtype), "bytes_per_token": per_token,
                     "capacity_factor": dtype.itemsize / kv_dtype.itemsize},
        "build_seconds": round(seconds, 2),
    }
