"""Encoder outputs against the references: sentence-transformers for embedders (pooling and normalization
from its own modules.json), transformers for classifiers. Batches mix lengths, so padding is exercised."""

import pytest
import torch
import torch.nn.functional as F

from ember.encoder.pooling import read_pooling_config
from ember.encoder.runner import EncoderInput
from ember.encoder.setup import build_encoder_setup
from tests.encoder.conftest import encoder_config

TEXTS = ["the quick brown fox jumps over the lazy dog", "paris", "what is the capital of france",
         "one two three four five six seven eight nine ten one two three"]
PAIRS = [("what is the capital of france", "paris is the capital city of france"),
         ("what is the capital of france", "the cat and the mouse"),
         ("who is it", "blue green red")]


def _inputs(tok, texts, pairs=None):
    enc = tok(texts, pairs) if pairs is not None else tok(texts)
    types = enc.get("token_type_ids")
    return [EncoderInput(ids, types[i] if types is not None else None) for i, ids in enumerate(enc["input_ids"])]


def _assert_close(ours, ref):
    cos = F.cosine_similarity(ours.double(), ref.double(), dim=-1)
    assert cos.min().item() > 0.9999, cos
    torch.testing.assert_close(ours, ref.float(), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("fixture,base_model", [("bert_mean_dir", "encoder_bert"), ("qwen3_last_dir", "encoder"),
                                                ("modernbert_mean_dir", "encoder_bert")])
def test_embedders_match_sentence_transformers(fixture, base_model, request):
    from sentence_transformers import SentenceTransformer

    path = request.getfixturevalue(fixture)
    setup = build_encoder_setup(encoder_config(path, base_model))
    assert setup.spec.task == "embed" and setup.pooling.source == "modules.json" and setup.pooling.normalize
    ours = setup.runner.run(_inputs(setup.tokenizer, TEXTS))
    ref = SentenceTransformer(str(path), device="cpu").encode(TEXTS, convert_to_tensor=True)
    _assert_close(ours, ref)
    # each input alone gives the same row as in the mixed-length batch
    alone = torch.cat([setup.runner.run(_inputs(setup.tokenizer, [t])) for t in TEXTS])
    _assert_close(alone, ours)


def test_config_pooling_overrides_and_defaults(bert_mean_dir, tmp_path):
    from transformers import AutoModel

    setup = build_encoder_setup(encoder_config(bert_mean_dir, pooling="cls", normalize=False))
    assert (setup.pooling.mode, setup.pooling.normalize, setup.pooling.source) == ("cls", False, "config")
    ours = setup.runner.run(_inputs(setup.tokenizer, TEXTS[:2]))
    hf = AutoModel.from_pretrained(bert_mean_dir).eval()
    with torch.no_grad():
        ref = torch.cat([hf(**setup.tokenizer(t, return_tensors="pt")).last_hidden_state[:, 0] for t in TEXTS[:2]])
    _assert_close(ours, ref)
    assert read_pooling_config(tmp_path, is_causal=True) .mode == "last"  # no sentence-transformers files
    (tmp_path / "modules.json").write_text('[{"type": "sentence_transformers.models.Dense", "path": "2_Dense"}]')
    with pytest.raises(ValueError, match="Dense"):
        read_pooling_config(tmp_path, is_causal=False)


def test_cross_encoder_matches_transformers(bert_reranker_dir):
    from transformers import AutoModelForSequenceClassification

    setup = build_encoder_setup(encoder_config(bert_reranker_dir))
    assert setup.spec.task == "classify" and setup.spec.num_labels == 1
    q, d = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    ours = setup.runner.run(_inputs(setup.tokenizer, q, d))
    hf = AutoModelForSequenceClassification.from_pretrained(bert_reranker_dir).eval()
    with torch.no_grad():
        ref = torch.cat([hf(**setup.tokenizer(a, b, return_tensors="pt")).logits for a, b in PAIRS])
    assert any(any(x.token_type_ids or []) for x in _inputs(setup.tokenizer, q, d))  # segment ids reach the model
    _assert_close(ours, ref)


@pytest.mark.parametrize("fixture", ["xlmr_classifier_dir", "modernbert_classifier_dir"])
def test_classifiers_match_transformers(fixture, request):
    from transformers import AutoModelForSequenceClassification

    path = request.getfixturevalue(fixture)
    setup = build_encoder_setup(encoder_config(path))
    assert setup.spec.task == "classify" and len(setup.spec.labels) == setup.spec.num_labels > 1
    ours = setup.runner.run(_inputs(setup.tokenizer, TEXTS))
    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        ref = torch.cat([hf(**setup.tokenizer(t, return_tensors="pt")).logits for t in TEXTS])
    _assert_close(ours, ref)


def test_bf16_fused_path_matches_float32_reference(bert_mean_dir):
    """bf16 on CPU runs the oneDNN-packed linears with bias+GELU and residual adds fused; same embeddings to bf16 precision."""
    from sentence_transformers import SentenceTransformer

    setup = build_encoder_setup(encoder_config(bert_mean_dir, dtype="bfloat16"))
    ours = setup.runner.run(_inputs(setup.tokenizer, TEXTS))
    ref = SentenceTransformer(str(bert_mean_dir), device="cpu").encode(TEXTS, convert_to_tensor=True)
    assert F.cosine_similarity(ours.double(), ref.double(), dim=-1).min().item() > 0.999


def test_embed_bench_runs_both_sides(bert_mean_dir, capsys):
    """`ember bench offline --task embed` on a checkpoint: both engines embed the same inputs alike (no timing asserted)."""
    from ember.bench.cli import main

    main(["offline", str(bert_mean_dir), "--task", "embed", "--num-prompts", "3", "--input-len", "16", "--repeats", "1", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert "embeddings/s" in out and "min cosine ember vs transformers 1.0000" in out
