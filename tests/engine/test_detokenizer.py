"""Incremental detokenization against the tokenizer's own full decode; stop strings never leak."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from ember.checkpoint.default import default_model_path

    gguf = default_model_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


TEXTS = [
    "Hello world, this is ember.",
    "Emoji 😀🎉 and accents: héllo, naïve, 東京 and 한국어.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "  leading spaces and\ttabs\n\nnewlines",
]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_matches_full_decode(tok, text):
    from ember.engine.detokenizer import Detokenizer

    prompt = tok.encode("Prompt: ")
    ids = tok.encode(text)
    d = Detokenizer(tok)
    state = d.new_state(prompt, stop=[])
    seen, text = [], ""
    for t in ids:
        d.append(state, [t])
        text += d.take(state)
        seen.append(text)
        assert "\ufffd" not in text  # never a split UTF-8 character
    d.finish(state)
    assert text + d.take(state) == tok.decode(ids)
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))  # text only grows


def test_long_sequences_keep_matching(tok):
    from ember.engine.detokenizer import Detokenizer

    text = " ".join(TEXTS * 10)
    ids = tok.encode(text)
    d = Detokenizer(tok)
    state = d.new_state([], stop=[])
    d.append(state, ids[:3])
    text = d.take(state)
    for t in ids[3:]:
        d.append(state, [t])
        text += d.take(state)
    d.finish(state)
    assert text + d.take(state) == tok.decode(ids)
    assert len(state.token_ids) <= 64 + 1 and not state.pending  # the state stays bounded


def test_stop_string_is_cut_and_never_leaks(tok):
    from ember.engine.detokenizer import Detokenizer

    ids = tok.encode("The answer is 42. STOP here please")
    d = Detokenizer(tok)
    state = d.new_state([], stop=["STOP", "never"])
    emitted, text = [], ""
    hit = False
    for t in ids:
        hit = d.append(state, [t])
        text += d.take(state)
        emitted.append(text)
        if hit:
            break
    assert hit and state.stop_reason == "STOP"
    assert text == "The answer is 42. "
    assert not any("ST" in e for e in emitted)  # a partial stop string is held back


def test_include_stop_string(tok):
    from ember.engine.detokenizer import Detokenizer

    d = Detokenizer(tok)
    state = d.new_state([], stop=["42"], include_stop_str=True)
    text = ""
    for t in tok.encode("The answer is 42 and more"):
        hit = d.append(state, [t])
        text += d.take(state)
        if hit:
            break
    assert text == "The answer is 42"
