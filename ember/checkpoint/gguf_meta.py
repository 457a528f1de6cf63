"""What a GGUF's metadata says besides its tensors: the transformers config, tokenizer, chat template."""

from __future__ import annotations

from ember.checkpoint.gguf_reader import GGUFFile


# ember's class -> transformers model_type where the GGUF's architecture name differs
_MODEL_TYPES = {"MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe", "Gemma3ForCausalLM": "gemma3_text"}
# experts' keys transformers' GGUF tables leave out (llama.cpp's names -> the config's)
_MOE_KEYS = {
    "mixtral": {"expert_count": "num_local_experts", "expert_used_count": "num_experts_per_tok"},
    "qwen3_moe": {"expert_feed_forward_length": "moe_intermediate_size"},
}


def gguf_hf_config(gguf: GGUFFile, architecture: str):
    """A transformers PretrainedConfig equal to `AutoConfig.from_pretrained(dir, gguf_file=name)`.

    Built from the already-parsed metadata with transformers' own GGUF key tables, which saves
    transformers re-reading the file with gguf's slow reader (seconds for a large vocabulary).
    """
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    model_type = gguf.architecture  # Mistral GGUFs say "llama" and load as Llama, as in transformers
    model_type = _MODEL_TYPES.get(architecture, model_type)
    config: dict = {"tie_word_embeddings": "output.weight" not in gguf.tensors}
    config.update(GGUF_CONFIG_DEFAULTS_MAPPING.get(model_type, {}))
    for key, value in gguf.metadata.items():
        prefix, _, rest = key.partition(".")
        renames = GGUF_CONFIG_MAPPING.get(prefix, {})
        if prefix == gguf.architecture:  # "qwen3moe." keys: transformers files them under "qwen3_moe"
            renames = GGUF_CONFIG_MAPPING.get(model_type, renames)
        if rest in renames and renames[rest] not in (None, -1):
            config[renames[rest]] = value
        elif prefix == gguf.architecture and rest in _MOE_KEYS.get(model_type, {}):
            config[_MOE_KEYS[model_type][rest]] = value
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in gguf.metadata:
        config["vocab_size"] = len(gguf.metadata["tokenizer.ggml.tokens"])
    config["model_type"] = model_type  # not general.architecture's "qwen3moe" / "llama" (with experts)
    config["architectures"] = [architecture]
    return AutoConfig.for_model(**config)


def gguf_tokenizer(gguf: GGUFFile):
    """A PreTrainedTokenizerFast built as `AutoTokenizer.from_pretrained(dir, gguf_file=name)` builds it."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        _SPECIAL_TOKENS,
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    metadata = gguf.metadata
    tokenizer_dict, tokenizer_config = (
        {name: metadata[f"tokenizer.{key}"] for key, name in GGUF_TOKENIZER_MAPPING[group].items()
         if f"tokenizer.{key}" in metadata}
        for group in ("tokenizer", "tokenizer_config")
    )
    if tokenizer_dict.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece vocabularies
    tokens = tokenizer_dict["tokens"]
    for name, key in _SPECIAL_TOKENS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokens[token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(gguf.architecture, tokenizer_dict)
    tokenizer_config.update(extra)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config)


def gguf_eos_token_ids(gguf: GGUFFile) -> list[int]:
    """End-of-generation ids: eos, plus llama.cpp's end-of-turn / end-of-message ids when given."""
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    ids = [int(gguf.metadata[key]) for key in keys if key in gguf.metadata]
    return list(dict.fromkeys(ids))
