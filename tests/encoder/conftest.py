"""Tiny random encoders written at test time: a WordPiece tokenizer, BERT / XLM-RoBERTa / Qwen3 bodies, and
sentence-transformers wrappers (modules.json + 1_Pooling) around them, each saved as safetensors."""

from pathlib import Path

import pytest

WORDS = ("the quick brown fox jumps over lazy dog a an of to in is it what where who how why paris france capital "
         "city river bank money music art science water fire earth wind cat mouse house tree green blue red "
         "one two three four five six seven eight nine ten").split()


def write_tokenizer(d: Path):
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    tok.save_pretrained(d)
    return tok


def _save(model, d: Path, pooling: str | None, normalize: bool = True):
    """Save `model` (and the tokenizer) at d; with `pooling`, as a sentence-transformers model."""
    tok = write_tokenizer(d)
    if pooling is None:
        model.save_pretrained(d, safe_serialization=True)
        return d
    from sentence_transformers import SentenceTransformer, models

    model.save_pretrained(d, safe_serialization=True)
    body = models.Transformer(str(d), max_seq_length=model.config.max_position_embeddings)
    mods = [body, models.Pooling(model.config.hidden_size, pooling_mode=pooling)] + ([models.Normalize()] if normalize else [])
    st = SentenceTransformer(modules=mods, device="cpu")
    st.save(str(d))
    tok.save_pretrained(d)
    return d


def bert_config(**kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      max_position_embeddings=64, **kw)


@pytest.fixture(scope="session")
def bert_mean_dir(tmp_path_factory) -> Path:
    """BertModel + mean pooling + Normalize, as sentence-transformers saves it."""
    import torch
    from transformers import BertModel

    torch.manual_seed(0)
    return _save(BertModel(bert_config()).eval(), tmp_path_factory.mktemp("bert_mean"), "mean")


@pytest.fixture(scope="session")
def qwen3_last_dir(tmp_path_factory) -> Path:
    """Qwen3Model + last-token pooling + Normalize (Qwen3-Embedding's layout)."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(1)
    cfg = Qwen3Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0)
    return _save(Qwen3Model(cfg).eval(), tmp_path_factory.mktemp("qwen3_last"), "lasttoken")


@pytest.fixture(scope="session")
def bert_reranker_dir(tmp_path_factory) -> Path:
    """BertForSequenceClassification with one label (a cross-encoder)."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(2)
    return _save(BertForSequenceClassification(bert_config(num_labels=1)).eval(), tmp_path_factory.mktemp("bert_rerank"), None)


@pytest.fixture(scope="session")
def xlmr_classifier_dir(tmp_path_factory) -> Path:
    """XLMRobertaForSequenceClassification with three named labels."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    torch.manual_seed(3)
    cfg = XLMRobertaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           max_position_embeddings=66, type_vocab_size=1, pad_token_id=0,
                           id2label={0: "negative", 1: "neutral", 2: "positive"},
                           label2id={"negative": 0, "neutral": 1, "positive": 2})
    return _save(XLMRobertaForSequenceClassification(cfg).eval(), tmp_path_factory.mktemp("xlmr_cls"), None)


def encoder_config(path: Path, base_model: str = "encoder_bert", **ember):
    from ember.config import load_config

    return load_config({"model_name": "enc", "trt_llm": {"build": {"base_model": base_model, "max_num_tokens": 256,
                                              "checkpoint_repository": {"source": "LOCAL", "repo": str(path)}}},
                        "ember": {"dtype": "float32", "device": "cpu", **ember}})


def modernbert_config(**kw):
    from transformers import ModernBertConfig

    return ModernBertConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                            local_attention=8, global_attn_every_n_layers=2, max_position_embeddings=128, pad_token_id=0,
                            bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3, **kw)


@pytest.fixture(scope="session")
def modernbert_mean_dir(tmp_path_factory) -> Path:
    """ModernBertModel (local layers with a 4-token band) + mean pooling + Normalize."""
    import torch
    from transformers import ModernBertModel

    torch.manual_seed(4)
    return _save(ModernBertModel(modernbert_config()).eval(), tmp_path_factory.mktemp("modernbert_mean"), "mean")


@pytest.fixture(scope="session")
def modernbert_classifier_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import ModernBertForSequenceClassification

    torch.manual_seed(5)
    model = ModernBertForSequenceClassification(modernbert_config(num_labels=2, classifier_pooling="mean")).eval()
    return _save(model, tmp_path_factory.mktemp("modernbert_cls"), None)
