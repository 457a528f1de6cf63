"""Pydantic models of the config: Baseten's Engine-Builder-LLM YAML plus ember's own `ember:` section.

See ember/config/__init__.py for how a config is built and validated."""


import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    AliasChoices,
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from ember.errors import ConfigError


DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"  # served name of the default model (DESIGN 3)
GiB = 1 << 30
MiB = 1 << 20

# Strict scalars: YAML `true` is not an integer, "8192" (a string) is not an integer.
PosInt = Annotated[int, Field(strict=True, ge=1)]
NonNegInt = Annotated[int, Field(strict=True, ge=0)]
Bool = Annotated[bool, Field(strict=True)]


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _choice(value: Any, allowed: tuple[str, ...], aliases: dict[str, str] = {}, rejected: dict[str, str] = {}):
    """Validates an enum-like string: canonical names pass, aliases map to canonical ones, known but
    unsupported names fail with their reason, anything else fails listing what is allowed."""
    if isinstance(value, str):
        if value in allowed:
            return value
        if value in aliases:
            return aliases[value]
        if value in rejected:
            raise ValueError(f"{_show(value)} is not supported: {rejected[value]}")
    raise ValueError(f"{_show(value)} is not one of {', '.join(allowed)}")


def _literal_values(tp) -> tuple[str, ...]:
    return typing.get_args(tp)


class _Section(BaseModel):
    """A strict section: unknown keys are errors (typos must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# ---------------------------------------------------------------- trt_llm.build

CheckpointSource = Literal["HF", "LOCAL", "GCS", "S3", "AZURE", "REMOTE_URL", "BASETEN_TRAINING"]
SOURCES_SUPPORTED_HERE = ("HF", "LOCAL")


class CheckpointRepository(_Section):
    """Where a checkpoint (or a LoRA adapter) lives. Only HF (the local Hugging Face cache, offline) and
    LOCAL (a directory or a .gguf file) can be read here; the others are accepted by the schema and
    refused by `EngineConfig.validate_for_this_host`."""

    source: CheckpointSource = "HF"  # Baseten's default
    repo: Annotated[str, Field(strict=True, min_length=1)]  # HF repo id, or a path for LOCAL
    revision: Optional[str] = None  # HF branch, tag or commit
    runtime_secret_name: Optional[str] = None  # Baseten secret name; unused here (no network)

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, v):
        return _choice(v.upper() if isinstance(v, str) else v, _literal_values(CheckpointSource))


QUANTIZATION_TYPES = ("no_quant", "fp8", "fp8_kv", "fp4", "fp4_kv", "fp4_mlp_only", "int8", "int4")
QuantizationType = Literal["no_quant", "fp8", "fp8_kv", "fp4", "fp4_kv", "fp4_mlp_only", "int8", "int4"]
_QUANT_ALIASES = {"weights_int8": "int8", "weights_int4": "int4"}  # Truss's older weight-only names
_QUANT_REJECTED = {
    "weights_kv_int8": "an int8 KV cache is not implemented; use fp8_kv (fp8 KV cache) or int8 (weights only)",
    "weights_int4_kv_int8": "an int8 KV cache is not implemented; use int4 (weights only) or fp8_kv",
    "smooth_quant": "SmoothQuant (int8 activations) is not implemented; use int8 (weights only) or fp8",
}


class QuantizationConfig(_Section):
    """Calibration for the quantized types that need scales (fp8_kv, fp4*)."""

    calib_size: Annotated[int, Field(strict=True, ge=1, le=16384)] = 1024  # number of calibration samples
    calib_dataset: Optional[str] = None  # local .txt/.jsonl file or built-in set name; None: ember's built-in set
    calib_max_seq_length: Annotated[int, Field(strict=True, ge=1, le=16384)] = 2048  # tokens per sample


class PluginConfiguration(_Section):
    """TensorRT-LLM plugin switches, accepted for compatibility. ember's KV cache is always paged and its
    attention always reads paged context, whatever these say."""

    paged_kv_cache: Bool = True
    use_paged_context_fmha: Bool = True
    use_fp8_context_fmha: Bool = False
    lora_plugin: Optional[str] = None  # older docs' LoRA plugin dtype; LoRA runs in the model dtype here


class LoraConfiguration(_Section):
    max_lora_rank: PosInt = 64  # rank r every adapter is padded to
    lora_target_modules: list[str] = []  # empty: derived from the adapters' adapter_config.json


SpecMode = Literal["LOOKAHEAD_DECODING"]


class SpeculatorConfig(_Section):
    """Lookahead decoding: a Jacobi window of W, n-grams of N, up to G verification candidates per step;
    `enable_b10_lookahead` adds suffix-match prompt lookup over the whole context."""

    speculative_decoding_mode: SpecMode = "LOOKAHEAD_DECODING"
    lookahead_windows_size: Optional[PosInt] = Field(
        None, validation_alias=AliasChoices("lookahead_windows_size", "windows_size"))  # W
    lookahead_ngram_size: Optional[PosInt] = Field(
        None, validation_alias=AliasChoices("lookahead_ngram_size", "ngram_size"))  # N
    lookahead_verification_set_size: Optional[PosInt] = Field(
        None, validation_alias=AliasChoices("lookahead_verification_set_size", "verification_set_size"))  # G
    enable_b10_lookahead: Bool = False
    num_draft_tokens: Optional[Annotated[int, Field(strict=True, ge=0, le=2048)]] = None  # None: from W, N, G
    # The draft-model fields of DRAFT_TOKENS_EXTERNAL; present only so that mode is what gets rejected.
    checkpoint_repository: Optional[CheckpointRepository] = None
    build: Optional[dict[str, Any]] = None
    runtime: Optional[dict[str, Any]] = None

    @model_validator(mode="before")
    @classmethod
    def _baseten_lookahead(cls, data):
        # Truss's shorthand: BASETEN_LOOKAHEAD is LOOKAHEAD_DECODING + b10 prompt lookup with its defaults.
        if isinstance(data, dict) and data.get("speculative_decoding_mode") == "BASETEN_LOOKAHEAD":
            data = dict(data, speculative_decoding_mode="LOOKAHEAD_DECODING", enable_b10_lookahead=True)
            data.setdefault("lookahead_ngram_size", 32)
            data.setdefault("lookahead_windows_size", 1)
            data.setdefault("lookahead_verification_set_size", 1)
        return data

    @field_validator("speculative_decoding_mode", mode="before")
    @classmethod
    def _mode(cls, v):
        return _choice(v, ("LOOKAHEAD_DECODING", "BASETEN_LOOKAHEAD"), rejected={
            "DRAFT_TOKENS_EXTERNAL": "draft-model speculation is planned; use LOOKAHEAD_DECODING",
            "EAGLE": "Eagle speculation is not implemented; use LOOKAHEAD_DECODING"})

    @model_validator(mode="after")
    def _lookahead_sizes(self):
        names = ("lookahead_windows_size", "lookahead_ngram_size", "lookahead_verification_set_size")
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"LOOKAHEAD_DECODING needs {', '.join(names)}; missing {', '.join(missing)}")
        needed = self.lookahead_draft_len(
            self.lookahead_windows_size, self.lookahead_ngram_size, self.lookahead_verification_set_size)
        if self.num_draft_tokens is not None and self.num_draft_tokens < needed:
            raise ValueError(f"num_draft_tokens {self.num_draft_tokens} is below the {needed} draft tokens that "
                             f"W={self.lookahead_windows_size}, N={self.lookahead_ngram_size}, "
                             f"G={self.lookahead_verification_set_size} produce")
        if needed > 2048:
            raise ValueError(f"W, N, G produce {needed} draft tokens per step, above the limit 2048; lower them")
        return self

    @staticmethod
    def lookahead_draft_len(windows_size: int, ngram_size: int, verification_set_size: int) -> int:
        """Tokens lookahead may add per step (TensorRT-LLM's formula, as Truss computes it)."""
        return (0 if ngram_size == 1 else ngram_size - 2) + (windows_size - 1 + verification_set_size) * (ngram_size - 1)

    @property
    def max_draft_len(self) -> int:
        return self.num_draft_tokens if self.num_draft_tokens is not None else self.lookahead_draft_len(
            self.lookahead_windows_size, self.lookahead_ngram_size, self.lookahead_verification_set_size)


BaseModelKind = Literal["decoder", "encoder", "encoder_bert"]  # encoder*: embedding/rerank/classify models
_LORA_NAME = re.compile(r"^[a-zA-Z0-9_\-.:]+$")


class BuildConfig(_Section):
    """`trt_llm.build`: what to load and how to optimize it (Baseten's names and defaults)."""

    base_model: BaseModelKind = "decoder"
    checkpoint_repository: Optional[CheckpointRepository] = None  # None: the default model
    max_seq_len: Optional[Annotated[int, Field(strict=True, ge=1, le=1048576)]] = None  # None: model's max_position_embeddings
    max_batch_size: Annotated[int, Field(strict=True, ge=1, le=2048)] = 256  # max running sequences
    max_num_tokens: Annotated[int, Field(strict=True, ge=1, le=1048576)] = 8192  # token budget per step
    max_beam_width: PosInt = 1
    max_prompt_embedding_table_size: NonNegInt = 0
    gather_all_token_logits: Bool = False  # accepted; prompt logprobs are computed on request
    strongly_typed: Bool = False  # accepted; a TensorRT build flag with no meaning here
    quantization_type: QuantizationType = "no_quant"
    quantization_config: QuantizationConfig = QuantizationConfig()
    tensor_parallel_count: PosInt = 1
    pipeline_parallel_count: PosInt = 1
    sequence_parallel_count: PosInt = 1
    # Baseten's MoE option: -1 (the default) or 1: every rank holds every expert (its intermediate dimension split);
    # N > 1 dividing tensor_parallel_count: the experts are split into N groups over the ranks (expert parallelism)
    moe_expert_parallel_option: Annotated[int, Field(strict=True, ge=-1)] = -1
    plugin_configuration: PluginConfiguration = PluginConfiguration()
    num_builder_gpus: Optional[PosInt] = None  # accepted; the build runs where ember runs
    speculator: Optional[SpeculatorConfig] = None
    lora_adapters: Optional[dict[str, CheckpointRepository]] = None  # adapter name (the request's `model`) -> checkpoint
    lora_configuration: Optional[LoraConfiguration] = None
    skip_build_result: Bool = False  # accepted; Baseten-internal

    @model_validator(mode="before")
    @classmethod
    def _legacy_max_lora_rank(cls, data):
        # Older Baseten docs put max_lora_rank directly under build.
        if isinstance(data, dict) and "max_lora_rank" in data:
            data = dict(data)
            rank = data.pop("max_lora_rank")
            lora = dict(data.get("lora_configuration") or {})
            lora.setdefault("max_lora_rank", rank)
            data["lora_configuration"] = lora
        return data

    @field_validator("base_model", mode="before")
    @classmethod
    def _base_model(cls, v):
        return _choice(v, ("decoder", "encoder", "encoder_bert"),
                       aliases={k: "decoder" for k in ("llama", "mistral", "qwen", "deepseek", "palmyra")},
                       rejected={"whisper": "speech models are not supported; ember serves decoder (CausalLM) and encoder models"})

    @model_validator(mode="after")
    def _encoder_features(self):
        if self.base_model == "decoder":
            return self
        for name in ("speculator", "lora_adapters"):
            if getattr(self, name):
                raise ValueError(f"{name} is for generation; base_model {self.base_model} serves embeddings, "
                                 "reranking and classification")
        return self

    @field_validator("quantization_type", mode="before")
    @classmethod
    def _quantization_type(cls, v):
        return _choice(v, QUANTIZATION_TYPES, _QUANT_ALIASES, _QUANT_REJECTED)

    @field_validator("max_beam_width")
    @classmethod
    def _beam(cls, v):
        if v > 1:
            raise ValueError(f"{v} is not supported: beam search is not implemented (Baseten also allows only 1)")
        return v

    @field_validator("pipeline_parallel_count", "sequence_parallel_count")
    @classmethod
    def _no_pp(cls, v):
        if v > 1:
            raise ValueError(f"{v} is not supported: only tensor parallelism is implemented; use tensor_parallel_count")
        return v

    @field_validator("moe_expert_parallel_option")
    @classmethod
    def _ep(cls, v, info):
        if v == 0:
            raise ValueError("0 is not a valid expert-parallel size; use -1 (every expert on every rank)")
        tp = info.data.get("tensor_parallel_count", 1)
        if v > 1 and tp % v:
            raise ValueError(f"{v} is not supported: expert parallelism splits the experts over the "
                             f"tensor-parallel ranks, so it must divide tensor_parallel_count ({tp}); use -1 "
                             "(every expert on every rank, each expert's intermediate dimension split)")
        return v

    @field_validator("max_prompt_embedding_table_size")
    @classmethod
    def _no_ptuning(cls, v):
        if v > 0:
            raise ValueError(f"{v} is not supported: prompt-tuning tables are not implemented; use 0")
        return v

    @field_validator("lora_adapters")
    @classmethod
    def _lora_names(cls, v):
        for name in v or {}:
            if not _LORA_NAME.match(name):
                raise ValueError(f"adapter name {name!r} may use only letters, digits, '_', '-', '.' and ':'")
        return v


# ---------------------------------------------------------------- trt_llm.runtime


class RuntimeConfig(_Section):
    """`trt_llm.runtime`: how the engine serves (Baseten's names and defaults)."""

    # Fraction of free device memory for the KV cache; on CPU, of ember.kv_cache_memory_bytes.
    kv_cache_free_gpu_mem_fraction: Annotated[float, Field(strict=True, gt=0, le=1)] = 0.9
    kv_cache_host_memory_bytes: Optional[PosInt] = None  # accepted; host offload of KV blocks is planned
    enable_chunked_context: Bool = True  # split long prompts over steps under max_num_tokens
    batch_scheduler_policy: Literal["guaranteed_no_evict", "max_utilization"] = "guaranteed_no_evict"
    request_default_max_tokens: Optional[PosInt] = None  # max_tokens when a request gives none
    served_model_name: Optional[str] = None  # the `model` name clients use; see EngineConfig.served_model_id
    total_token_limit: PosInt = 500000  # bound on tokens held by queued + running requests
    webserver_default_route: Optional[Literal["/v1/embeddings", "/rerank", "/predict"]] = None  # encoders only


class TrtLlmConfig(_Section):
    inference_stack: Literal["v1"] = "v1"
    build: BuildConfig = BuildConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    version_overrides: dict[str, Any] = {}  # accepted; Baseten image versions

    @field_validator("inference_stack", mode="before")
    @classmethod
    def _stack(cls, v):
        return _choice(v, ("v1",), rejected={
            "v2": "that is Baseten's BIS-LLM stack; ember implements Engine-Builder-LLM (inference_stack: v1)"})

    @model_validator(mode="before")
    @classmethod
    def _v2_first(cls, data):
        # A v2 config has v2-only runtime keys; report the stack, not those keys.
        if isinstance(data, dict) and data.get("inference_stack") == "v2":
            return {"inference_stack": "v2"}
        return data


# ---------------------------------------------------------------- ember


class LimitsConfig(_Section):
    """Bounds on every request field (DESIGN 5). A request over a bound is a 400 naming the field."""

    max_n: PosInt = 16  # choices per request
    max_tokens_limit: Optional[PosInt] = None  # cap on max_tokens; None: whatever fits in max_seq_len
    max_prompt_tokens: Optional[PosInt] = None  # None: max_seq_len - 1
    max_stop_sequences: NonNegInt = 16
    max_stop_length: PosInt = 256  # characters per stop string
    max_logprobs: NonNegInt = 20  # top_logprobs / logprobs
    max_body_bytes: PosInt = 8 * MiB  # HTTP request body (413 above)
    max_schema_bytes: PosInt = 64 * 1024  # JSON schema / regex / grammar text
    max_schema_depth: PosInt = 32  # nesting depth of a JSON schema


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class FaultInjection(_Section):
    """For tests of start-up failures: one tensor-parallel worker rank loads another checkpoint (e.g. a missing
    path or a broken file), so it fails the way a rank with a bad shard would while the others start."""

    rank: PosInt  # the worker rank (1 .. tensor_parallel_count - 1)
    checkpoint_repository: CheckpointRepository  # what that rank loads instead of trt_llm.build's


class SamplingDefaults(_Section):
    """Defaults for the sampling fields a request leaves out (or sends as null), over the checkpoint's own
    (generation_config.json / GGUF general.sampling.*); unset fields keep the checkpoint's, then OpenAI's."""

    temperature: Optional[Annotated[float, Field(ge=0.0, le=2.0)]] = None
    top_p: Optional[Annotated[float, Field(ge=0.0, le=1.0)]] = None
    top_k: Optional[Annotated[int, Field(strict=True, ge=-1)]] = None  # -1: off
    min_p: Optional[Annotated[float, Field(ge=0.0, le=1.0)]] = None
    repetition_penalty: Optional[Annotated[float, Field(gt=0.0, le=10.0)]] = None


class EmberSection(_Section):
    """ember's own settings, under the top-level `ember:` key."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 where the hardware has bf16 units
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    host: str = "127.0.0.1"
    port: Annotated[int, Field(strict=True, ge=0, le=65535)] = 8000  # 0: any free port
    api_key: Optional[Annotated[str, Field(min_length=1)]] = None  # required as a Bearer token when set
    kv_cache_memory_bytes: PosInt = 1 * GiB  # KV budget on CPU (ints or '2GiB'); scaled by kv_cache_free_gpu_mem_fraction
    block_size: PosInt = 16  # tokens per KV block
    enable_prefix_caching: Bool = True  # share full KV blocks between requests with a common prefix
    max_queue_size: PosInt = 256  # waiting requests; beyond it new ones get 429
    num_threads: Optional[PosInt] = None  # CPU threads for torch; None: torch's default
    enforce_eager: bool = False  # never replay CUDA graphs (GPU) nor run the compiled forward (CPU)
    compile: bool = False  # CPU: torch.compile the model's layers at start-up (ember.models.compiled)
    # where `ember serve CONFIG` / `LLM(CONFIG)` keep the engines they build for a quantization_type
    # (ember.build.engine_cache); None: ~/.cache/ember/engines
    engine_cache_dir: Optional[str] = None
    chat_template: Optional[str] = None  # a Jinja file path or inline template; None: the checkpoint's
    trust_request_chat_template: Bool = False  # let requests send their own chat_template
    drain_timeout_s: Annotated[float, Field(strict=True, ge=0)] = 30.0  # on SIGTERM, wait this long for running requests
    max_loras: Annotated[int, Field(strict=True, ge=1, le=256)] = 4  # LoRA adapters in device slots, and per batch
    lora_runtime_dir: Optional[str] = None  # set: /v1/load_lora_adapter may load adapters from inside this directory
    # batch- and prefix-cache-invariant attention (same key chunks for every token), at some speed cost; see
    # README "Reproducibility" for what is and is not invariant yet
    deterministic: Bool = False
    fault_injection: Optional[FaultInjection] = None  # tests only: see FaultInjection
    strict_model_name: Bool = False  # True: a request `model` that is neither the served name nor an adapter is a 404 (vLLM);
    # False: any other name serves the base model (Baseten routes by URL; its docs say `model` "can be any string")
    limits: LimitsConfig = LimitsConfig()
    sampling_defaults: Optional[SamplingDefaults] = None  # see SamplingDefaults
    # Encoders (base_model encoder | encoder_bert) when the checkpoint has no sentence-transformers files:
    pooling: Optional[Literal["cls", "mean", "last", "max"]] = None  # None: modules.json, else cls (BERT) / last (causal)
    normalize: Optional[Bool] = None  # L2-normalize embeddings; None: modules.json's Normalize, else true

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, v):
        return _choice(v, ("auto", "float32", "bfloat16", "float16"),
                       aliases={"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"})

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        if not _DEVICE.match(v):
            raise ValueError(f"{_show(v)} is not one of auto, cpu, cuda, cuda:N")
        return v

    @field_validator("kv_cache_memory_bytes", mode="before")
    @classmethod
    def _bytes(cls, v):
        if isinstance(v, str):  # '512MiB', '2GiB', '1.5GB'
            try:
                return int(TypeAdapter(ByteSize).validate_python(v))
            except ValidationError:
                raise ValueError(f"{_show(v)} is not a size; use bytes or e.g. '512MiB', '2GiB'") from None
        return v

    @field_validator("block_size")
    @classmethod
    def _pow2(cls, v):
        if v > 1024 or v & (v - 1):
            raise ValueError(f"{v} is not allowed; use a power of two from 1 to 1024")
        return v


# ---------------------------------------------------------------- top level


class Resources(BaseModel):
    """Truss `resources`, kept as given: ember runs on the machine it is started on."""

    model_config = ConfigDict(extra="allow", frozen=True)
    accelerator: Optional[str] = None  # e.g. H100, H100:4, L4
    cpu: Optional[Union[str, int, float]] = None
    memory: Optional[Union[str, int]] = None
    use_gpu: Optional[bool] = None


_SECTIONS = ("model_name", "resources", "trt_llm", "ember")


class EngineConfig(BaseModel):
    """One validated config, threaded through constructors. Other Truss top-level keys (model_metadata,
    secrets, requirements, ...) are kept unchanged and not interpreted."""

    model_config = ConfigDict(extra="allow", frozen=True)
    model_name: Optional[str] = None
    resources: Resources = Resources()
    trt_llm: TrtLlmConfig = TrtLlmConfig()
    ember: EmberSection = EmberSection()

    @property
    def served_model_id(self) -> str:
        """The name /v1/models lists and requests' `model` must match (LoRA adapters add their names)."""
        rt, repo = self.trt_llm.runtime, self.trt_llm.build.checkpoint_repository
        if rt.served_model_name:
            return rt.served_model_name
        if self.model_name:
            return self.model_name
        if repo is not None:
            name = Path(repo.repo).name if repo.source == "LOCAL" else repo.repo
            return name[: -len(".gguf")] if name.endswith(".gguf") else name
        return DEFAULT_MODEL_ID

    def normalized_dict(self, redact_secrets: bool = True) -> dict[str, Any]:
        """Every field with its defaults filled in, aliases resolved, as plain JSON-able data."""
        data = self.model_dump(mode="json")
        if redact_secrets and data["ember"].get("api_key"):
            data["ember"]["api_key"] = "***"
        return data

    def validate_for_this_host(self) -> None:
        """Checks what the schema cannot: checkpoints must be readable here, offline."""
        build = self.trt_llm.build
        repos = [("trt_llm.build.checkpoint_repository", build.checkpoint_repository)]
        repos += [(f"trt_llm.build.lora_adapters.{n}", r) for n, r in (build.lora_adapters or {}).items()]
        for path, repo in repos:
            if repo is None:
                continue
            if repo.source not in SOURCES_SUPPORTED_HERE:
                raise ConfigError(
                    f"{path}.source: {repo.source!r} is not supported here: ember runs without network access "
                    "and reads checkpoints only from the local Hugging Face cache (HF) or a local path (LOCAL)")
            if repo.source == "LOCAL" and not Path(repo.repo).expanduser().exists():
                raise ConfigError(
                    f"{path}.repo: {repo.repo!r} does not exist; source LOCAL needs a directory "
                    "(safetensors + config.json + tokenizer, or an engine directory) or a .gguf file")


# Truss top-level keys (truss_config.py), so that none of them is mistaken for a typo of ours.
