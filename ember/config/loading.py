"""Building the one `EngineConfig`: reading YAML / dicts / model, engine and GGUF paths, flat overrides,
and the one-line, field-naming error messages."""


import difflib
import json
import os
import re
import typing
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import AliasChoices, BaseModel, ValidationError

from ember.config.schema import (
    _SECTIONS,
    BuildConfig,
    CheckpointRepository,
    EmberSection,
    EngineConfig,
    LimitsConfig,
    RuntimeConfig,
    _show,
)
from ember.errors import ConfigError


_TRUSS_KEYS = frozenset("""
model_name description model_class_name model_module_dir data_dir bundled_packages_dir external_package_dirs
model_metadata model_framework model_type requirements requirements_file system_packages environment_variables
secrets resources runtime python_version base_image docker_server model_cache cache_internal external_data
build build_commands live_reload apply_library_patches spec_version input_type examples_filename
use_local_src training_checkpoints trt_llm deploy_timeout_minutes weights
""".split())


# ---------------------------------------------------------------- errors


def _model_at(path: tuple) -> Optional[type[BaseModel]]:
    """The model class a validation-error location points into (for the known keys of a section)."""
    cls: Any = EngineConfig
    for part in path:
        if cls is dict:  # a mapping value (lora_adapters.<name>): the key itself says nothing
            cls = CheckpointRepository
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        cls = _unwrap(cls.model_fields[part].annotation)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _unwrap(tp):
    for arg in (typing.get_args(tp) if typing.get_origin(tp) is Union else (tp,)):
        if typing.get_origin(arg) is dict:
            return dict
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _known_keys(cls: type[BaseModel]) -> list[str]:
    keys = []
    for name, field in cls.model_fields.items():
        keys.append(name)
        if isinstance(field.validation_alias, AliasChoices):
            keys += [a for a in field.validation_alias.choices if isinstance(a, str)]
    return keys


def _format_error(err: dict) -> str:
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc) or "config"
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind == "extra_forbidden":
        cls = _model_at(loc[:-1])
        known = _known_keys(cls) if cls else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(known)
        return f"{where}: unknown key {str(loc[-1])!r}; {hint}"
    if kind in ("value_error", "assertion_error"):
        return f"{where}: {ctx.get('error', err['msg'])}"
    if kind == "literal_error":  # ctx: "'a', 'b' or 'c'"
        allowed = [s.strip(" '") for s in re.split(r",| or ", ctx.get("expected", "")) if s.strip()]
        return f"{where}: {_show(value)} is not one of {', '.join(allowed)}"
    if kind == "missing":
        return f"{where}: is required"
    limits = {"greater_than_equal": ("too small", ">=", "ge"), "greater_than": ("too small", ">", "gt"),
              "less_than_equal": ("too large", "<=", "le"), "less_than": ("too large", "<", "lt")}
    if kind in limits:
        word, op, key = limits[kind]
        return f"{where}: {_show(value)} is {word}; it must be {op} {ctx.get(key)}"
    expected = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
                "bool_type": "a boolean (true or false)", "bool_parsing": "a boolean (true or false)",
                "float_type": "a number", "float_parsing": "a number", "string_type": "a string",
                "model_type": "a mapping", "model_attributes_type": "a mapping", "dict_type": "a mapping",
                "list_type": "a list", "string_too_short": "a non-empty string"}
    if kind in expected:
        return f"{where}: {_show(value)} is not {expected[kind]}"
    return f"{where}: {err['msg']} (got {_show(value)})"


# ---------------------------------------------------------------- loading


def _override_paths() -> dict[str, tuple[str, ...]]:
    """Flat override name -> dotted path, e.g. dtype -> ember.dtype, max_seq_len -> trt_llm.build.max_seq_len."""
    paths: dict[str, tuple[str, ...]] = {"model_name": ("model_name",)}
    for prefix, cls in ((("trt_llm", "build"), BuildConfig), (("trt_llm", "runtime"), RuntimeConfig),
                        (("ember",), EmberSection), (("ember", "limits"), LimitsConfig)):
        for name in cls.model_fields:
            if name != "limits":
                assert name not in paths, f"override name {name} is ambiguous"
                paths[name] = (*prefix, name)
    return paths


_OVERRIDES = _override_paths()


def parse_config(data: dict[str, Any]) -> EngineConfig:
    """Validates a config mapping against the schema only (no host checks)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: the top level must be a mapping, not {type(data).__name__}")
    for key in data:
        # Truss keys are open-ended, but a near miss of one of ours (trtllm, embr) must not pass silently.
        close = difflib.get_close_matches(str(key), _SECTIONS, n=1, cutoff=0.75)
        if key not in _SECTIONS and key not in _TRUSS_KEYS and close:
            raise ConfigError(f"{key}: unknown top-level key {str(key)!r}; did you mean {close[0]!r}?")
    try:
        return EngineConfig.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(_format_error(errors[0]) + more) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{at} is not valid YAML: {getattr(e, 'problem', None) or e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read: {e.strerror}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, not {type(data).__name__}")
    return data


# build settings an engine directory keeps: serving it uses what it was built for
_ENGINE_BUILD_KEYS = ("max_seq_len", "max_batch_size", "max_num_tokens", "quantization_type", "speculator",
                      "lora_configuration", "tensor_parallel_count")


def _local_model(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = {"model_name": path.name[:-5] if path.name.endswith(".gguf") else path.name,
                            "trt_llm": {"build": {"checkpoint_repository": {"source": "LOCAL", "repo": str(path)}}}}
    manifest = path / "manifest.json" if path.is_dir() else None
    if manifest is not None and manifest.is_file():
        try:
            built = json.loads(manifest.read_text())["build"]["config"]
        except (ValueError, KeyError, TypeError):
            return data  # the engine loader reports a damaged manifest with a precise error
        build = (built.get("trt_llm") or {}).get("build") or {}
        for key in _ENGINE_BUILD_KEYS:
            if build.get(key) is not None:
                data["trt_llm"]["build"][key] = build[key]
        if (built.get("trt_llm") or {}).get("runtime"):
            data["trt_llm"]["runtime"] = built["trt_llm"]["runtime"]
        if built.get("model_name"):
            data["model_name"] = built["model_name"]
    return data


def _read_source(source) -> tuple[dict[str, Any], Path]:
    """Raw config mapping and the directory relative LOCAL paths are resolved against."""
    if source is None:
        return {}, Path.cwd()
    if isinstance(source, EngineConfig):
        return source.normalized_dict(redact_secrets=False), Path.cwd()
    if isinstance(source, dict):
        return source, Path.cwd()
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"config: {type(source).__name__} is not a config; pass a YAML path, a dict, "
                          "a model or engine directory, a .gguf file or None")
    path = Path(source).expanduser().absolute()
    if path.is_dir():
        is_model = any((path / f).exists() for f in ("config.json", "manifest.json")) or any(path.glob("*.gguf"))
        if not is_model and (path / "config.yaml").is_file():  # a Truss directory
            return _read_yaml(path / "config.yaml"), path
        if not is_model:
            raise ConfigError(f"{source}: is not a model directory (no config.json, manifest.json or .gguf) "
                              "nor a Truss directory (no config.yaml)")
        return _local_model(path), path
    if not path.exists():
        raise ConfigError(f"{source}: no such file or directory")
    if path.suffix == ".gguf":
        return _local_model(path), path.parent
    return _read_yaml(path), path.parent


def _set(data: dict, path: tuple[str, ...], value) -> dict:
    """A copy of `data` with `value` at `path` (copying only the dicts on the way)."""
    data = dict(data)
    head, *rest = path
    if rest:
        inner = data.get(head)
        data[head] = _set(inner if isinstance(inner, dict) else {}, tuple(rest), value)
    else:
        data[head] = value
    return data


def _resolve_local_paths(data: dict, base: Path) -> dict:
    build = (data.get("trt_llm") or {}).get("build") if isinstance(data.get("trt_llm"), dict) else None
    if not isinstance(build, dict):
        return data

    def fix(repo):
        if isinstance(repo, dict) and str(repo.get("source", "")).upper() == "LOCAL" and isinstance(repo.get("repo"), str):
            p = Path(repo["repo"]).expanduser()
            return dict(repo, repo=str(p if p.is_absolute() else (base / p).resolve()))
        return repo

    if "checkpoint_repository" in build:
        data = _set(data, ("trt_llm", "build", "checkpoint_repository"), fix(build["checkpoint_repository"]))
    if isinstance(build.get("lora_adapters"), dict):
        data = _set(data, ("trt_llm", "build", "lora_adapters"),
                    {k: fix(v) for k, v in build["lora_adapters"].items()})
    return data


def load_config(source=None, **overrides) -> EngineConfig:
    """Builds the one `EngineConfig`.

    source: a YAML path (Baseten/Truss config.yaml, optionally with an `ember:` section), a Truss
    directory holding config.yaml, a dict, an `EngineConfig`, a model directory (safetensors +
    config.json + tokenizer), an engine directory (manifest.json), a .gguf file, or None (the default
    model). overrides: flat field names (dtype='float32', max_seq_len=2048, port=0, served_model_name=...)
    placed at their dotted path before validation; None values are ignored. Relative LOCAL paths are
    resolved against the YAML file's directory. Raises ConfigError with a one-line, field-naming message.
    """
    data, base = _read_source(source)
    for name, value in overrides.items():
        if name not in _OVERRIDES:
            close = difflib.get_close_matches(name, list(_OVERRIDES), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"override {name!r} is not a config field{hint}")
        if value is not None:
            if isinstance(value, BaseModel):
                value = value.model_dump(mode="json")
            data = _set(data, _OVERRIDES[name], value)
    cfg = parse_config(_resolve_local_paths(data, base))
    cfg.validate_for_this_host()
    return cfg
