"""Safetensors directories written from transformers, and where checkpoints are looked up."""

import json
import shutil

import pytest
import torch

from ember.checkpoint import default_model_path, load_checkpoint, resolve_checkpoint_path

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def _save(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5], "bos_token_id": 1}))
    return path


@pytest.mark.parametrize("max_shard_size", [None, "20KB"])
def test_safetensors_dir_reads_back_identical(tiny_model, tmp_path, max_shard_size):
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    path = _save(tiny_model, tmp_path / "model", **kwargs)
    if max_shard_size:
        assert (path / "model.safetensors.index.json").is_file()
        assert len(list(path.glob("*.safetensors"))) > 1
    ckpt = load_checkpoint(path)
    assert ckpt.format == "safetensors" and ckpt.architecture == "LlamaForCausalLM"
    ours, theirs = ckpt.hf_config.to_dict(), tiny_model.config.to_dict()
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "intermediate_size", "rms_norm_eps", "rope_parameters", "tie_word_embeddings"):
        assert ours[key] == theirs[key], key
    assert ckpt.chat_template == TEMPLATE
    assert ckpt.eos_token_ids == [2, 5] and ckpt.bos_token_id == 1 and ckpt.max_position_embeddings == 512
    weights = dict(ckpt.iter_weights())
    state = tiny_model.state_dict()
    assert set(weights) == set(state)
    for name, tensor in weights.items():
        assert tensor.dtype == state[name].dtype and torch.equal(tensor, state[name]), name


def test_dir_tokenizer_and_jinja_template(tiny_model, tmp_path):
    path = tmp_path / "model"
    tiny_model.save_pretrained(path)
    default = load_checkpoint(default_model_path())
    default.load_tokenizer().save_pretrained(path)
    (path / "tokenizer_config.json").write_text(
        json.dumps({k: v for k, v in json.loads((path / "tokenizer_config.json").read_text()).items()
                    if k != "chat_template"})
    )
    (path / "chat_template.jinja").write_text(TEMPLATE)
    ckpt = load_checkpoint(path)
    assert ckpt.chat_template == TEMPLATE
    tok = ckpt.load_tokenizer()
    text = "Hello world, I'm SmolLM!"
    assert tok(text).input_ids == default.load_tokenizer()(text).input_ids


def test_pickle_only_dir_is_refused(tiny_model, tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    tiny_model.config.save_pretrained(path)
    (path / "pytorch_model.bin").write_bytes(b"not even loaded")
    with pytest.raises(ValueError, match="only safetensors and GGUF"):
        load_checkpoint(path)


def test_local_source(tiny_model, tmp_path):
    path = _save(tiny_model, tmp_path / "model")
    assert resolve_checkpoint_path("LOCAL", str(path)) == path
    gguf = default_model_path()
    assert resolve_checkpoint_path("LOCAL", str(gguf)) == gguf
    assert resolve_checkpoint_path("LOCAL", str(gguf.parent)) == gguf  # a dir with one lone .gguf
    assert resolve_checkpoint_path("HF", None) == gguf  # no repo: the default model
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint_path("LOCAL", str(tmp_path / "missing"))


@pytest.mark.parametrize("source", ["GCS", "S3", "AZURE", "REMOTE_URL"])
def test_remote_sources_not_supported(source):
    with pytest.raises(ValueError, match=f"source {source} is not supported here"):
        resolve_checkpoint_path(source, "org/model")


def test_config_object_is_accepted(tiny_model, tmp_path):
    from types import SimpleNamespace

    path = _save(tiny_model, tmp_path / "model")
    repository = SimpleNamespace(source="LOCAL", repo=str(path), revision=None)
    cfg = SimpleNamespace(trt_llm=SimpleNamespace(build=SimpleNamespace(checkpoint_repository=repository)))
    assert resolve_checkpoint_path(cfg) == path == resolve_checkpoint_path(repository)


def test_hf_source_from_local_cache(tiny_model, tmp_path):
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / "models--tiny-org--tiny-llama"
    _save(tiny_model, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)

    snapshot = repo_dir / "snapshots" / commit
    assert resolve_checkpoint_path("HF", "tiny-org/tiny-llama", None, cache_dir=cache) == snapshot
    assert resolve_checkpoint_path("HF", "tiny-org/tiny-llama", "main", cache_dir=cache) == snapshot
    assert resolve_checkpoint_path("HF", "tiny-org/tiny-llama", commit, cache_dir=cache) == snapshot
    assert load_checkpoint(snapshot).architecture == "LlamaForCausalLM"

    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache and there is no network"):
        resolve_checkpoint_path("HF", "tiny-org/absent", None, cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        resolve_checkpoint_path("HF", "tiny-org/tiny-llama", "v9", cache_dir=cache)
    shutil.rmtree(cache)
