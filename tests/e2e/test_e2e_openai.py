"""The real server (default model, float32) driven by the official `openai` SDK: chat and completions,
streaming and not, n=2, stop, seed reproducibility, logprobs, usage counted by the tokenizer; and
`baseten-performance-client` batch_post of 20 chat payloads."""

from __future__ import annotations

import math

import openai
import pytest
import torch

from e2e_server import API_KEY, real_server, wait_until

MSGS = [{"role": "user", "content": "Name three colors."}]
PROMPT = "The capital of France is"
FIXED = {"ignore_eos": True}  # extra_body: exactly max_tokens tokens, whatever the model says


@pytest.fixture(scope="module")
def server():
    # float32: greedy outputs are batch-invariant there (bf16 rounding can flip near-ties), and
    # several tests compare one greedy text reached two ways (streamed, batched, prefix-cached)
    with real_server(api_key=API_KEY, dtype="float32") as s:
        yield s
        assert wait_until(s.is_idle), "requests or KV blocks left over"  # every request finished or aborted


@pytest.fixture(scope="module")
def sdk(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as client:
        yield client


def rendered_prompt_ids(server, messages) -> list[int]:
    """What the chat template renders for `messages`, tokenized without added specials (the
    template writes its own), computed here from the tokenizer rather than asked of the server."""
    tok = server.engine.tokenizer
    text = tok.apply_chat_template(messages, chat_template=server.engine.chat_template, tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def test_models(sdk, server):
    assert [m.id for m in sdk.models.list()] == [server.model]


def test_chat(sdk, server):
    resp = sdk.chat.completions.create(model=server.model, messages=MSGS, max_tokens=8, temperature=0)
    (choice,) = resp.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    ids = rendered_prompt_ids(server, MSGS)
    assert resp.usage.prompt_tokens == len(ids)
    assert 0 < resp.usage.completion_tokens <= 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    # the server's own /tokenize agrees with the tokenizer
    with server.client() as http:
        assert http.post("/tokenize", json={"messages": MSGS}).json()["tokens"] == ids

    # the stream carries the same greedy text, its usage last
    chunks = list(sdk.chat.completions.create(
        model=server.model, messages=MSGS, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens) == (resp.usage.prompt_tokens, resp.usage.completion_tokens)
    assert all(c.usage is None for c in chunks[:-1])


def test_completions(sdk, server):
    resp = sdk.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, temperature=0, extra_body=FIXED)
    (choice,) = resp.choices
    assert choice.finish_reason == "length" and choice.text
    tok = server.engine.tokenizer
    assert resp.usage.prompt_tokens == len(tok.encode(PROMPT))
    assert resp.usage.completion_tokens == 6

    chunks = list(sdk.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body=FIXED))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == resp.usage.prompt_tokens

    # token ids as the prompt, and a batch of prompts: one choice each, in order
    ids = tok.encode(PROMPT)
    by_ids = sdk.completions.create(model=server.model, prompt=ids, max_tokens=6, temperature=0, extra_body=FIXED)
    assert by_ids.choices[0].text == choice.text
    batch = sdk.completions.create(model=server.model, prompt=[PROMPT, "1, 2, 3,"], max_tokens=6, temperature=0, extra_body=FIXED)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == choice.text
    assert batch.usage.prompt_tokens == len(ids) + len(tok.encode("1, 2, 3,")) and batch.usage.completion_tokens == 12


def test_n2(sdk, server):
    resp = sdk.chat.completions.create(model=server.model, messages=MSGS, max_tokens=8, n=2, temperature=1.0, seed=7, extra_body=FIXED)
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.message.content and c.finish_reason == "length" for c in resp.choices)
    assert resp.usage.completion_tokens == 16

    texts = {0: "", 1: ""}
    finish = {}
    for c in sdk.chat.completions.create(model=server.model, messages=MSGS, max_tokens=8, n=2, temperature=1.0, seed=7,
                                         stream=True, extra_body=FIXED):
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert all(texts.values()) and finish == {0: "length", 1: "length"}

    comp = sdk.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, n=2, temperature=1.0, extra_body=FIXED)
    assert [c.index for c in comp.choices] == [0, 1] and comp.usage.completion_tokens == 12


def test_stop(sdk, server):
    full = sdk.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0, extra_body=FIXED).choices[0].text
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    expected = full[:full.index(stop)]
    resp = sdk.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "@@never@@"])
    assert resp.choices[0].text == expected and resp.choices[0].finish_reason == "stop"
    streamed = list(sdk.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"

    chat_full = sdk.chat.completions.create(model=server.model, messages=MSGS, max_tokens=8, temperature=0).choices[0].message.content
    chat_stop = chat_full.split()[1]
    chat = sdk.chat.completions.create(model=server.model, messages=MSGS, max_tokens=8, temperature=0, stop=chat_stop)
    assert chat.choices[0].message.content == chat_full[:chat_full.index(chat_stop)]
    assert chat.choices[0].finish_reason == "stop"


def test_seed_reproducible(sdk, server):
    def chat(seed, stream=False):
        kw = dict(model=server.model, messages=MSGS, max_tokens=8, temperature=1.0, seed=seed, extra_body=FIXED)
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(stream=True, **kw) if c.choices)
        return sdk.chat.completions.create(**kw).choices[0].message.content

    first = chat(1234)
    assert chat(1234, stream=True) == first
    assert any(chat(seed) != first for seed in (1, 2, 3))  # the seed, not greedy decoding, made them equal

    def comp(seed):
        return sdk.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, temperature=1.2, seed=seed, extra_body=FIXED).choices[0].text

    assert comp(99) == comp(99)


def test_logprobs(sdk, server):
    resp = sdk.chat.completions.create(model=server.model, messages=MSGS, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3,
                                       extra_body=FIXED)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 8
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0 and math.isfinite(t.logprob)
        assert t.top_logprobs[0].token == t.token  # greedy picks the most likely token
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)

    streamed = [c for c in sdk.chat.completions.create(model=server.model, messages=MSGS, max_tokens=8, temperature=0, logprobs=True,
                                                        top_logprobs=3, stream=True, extra_body=FIXED)]
    streamed_tokens = [t.token for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed_tokens == [t.token for t in content]

    comp = sdk.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, extra_body=FIXED)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == comp.choices[0].text
    assert all(len(top) == 2 and max(top.values()) == pytest.approx(v, abs=1e-4) for top, v in zip(lp.top_logprobs, lp.token_logprobs))

    echo = sdk.completions.create(model=server.model, prompt=PROMPT, max_tokens=2, temperature=0, logprobs=1, echo=True, extra_body=FIXED)
    assert echo.choices[0].text.startswith(PROMPT)
    assert echo.choices[0].logprobs.token_logprobs[0] is None  # the first prompt token has no logprob


def test_logit_bias(sdk, server):
    """Ban the token greedy decoding picks first: it never appears; force a token: every token is it; a biased
    request batched with an unbiased one leaves the unbiased one's output unchanged."""
    import asyncio

    tok = server.engine.tokenizer
    plain = sdk.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0, extra_body=FIXED)
    first = tok.encode(plain.choices[0].logprobs.tokens[0], add_special_tokens=False)[0]
    banned = sdk.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0,
                                    logit_bias={str(first): -100}, extra_body=FIXED)
    assert banned.choices[0].text != plain.choices[0].text
    assert first not in tok.encode(banned.choices[0].text, add_special_tokens=False)
    forced = tok.encode(" blue", add_special_tokens=False)[0]
    chat = sdk.chat.completions.create(model=server.model, messages=MSGS, max_tokens=5, temperature=0, logit_bias={str(forced): 100},
                                       logprobs=True, extra_body=FIXED)
    assert [tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(tok.encode(t.token, add_special_tokens=False))[0])
            for t in chat.choices[0].logprobs.content] == [forced] * 5
    assert chat.choices[0].message.content == tok.decode([forced] * 5)

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as client:
            def one(**kw):
                return client.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, temperature=0, extra_body=FIXED, **kw)
            return await asyncio.gather(one(logit_bias={str(first): -100}), one(), one(logit_bias={str(forced): 100}))

    biased, unbiased, forced_out = asyncio.run(main())
    assert unbiased.choices[0].text == plain.choices[0].text
    assert biased.choices[0].text == banned.choices[0].text and forced_out.choices[0].text == tok.decode([forced] * 6)
    for bad in ({"x": 1}, {"1": 101}, {str(10**7): 1}):
        with pytest.raises(openai.BadRequestError) as exc:
            sdk.completions.create(model=server.model, prompt=PROMPT, max_tokens=2, logit_bias=bad)
        assert exc.value.param == "logit_bias"


def test_echo_logprobs_match_transformers(sdk, server):
    """echo + logprobs: the prompt tokens' teacher-forced logprobs (null only for the first), as transformers
    computes them on the same weights; max_tokens=0 returns just the prompt (lm-evaluation-harness loglikelihood)."""
    from transformers import AutoModelForCausalLM

    from ember.checkpoint.default import default_model_path

    gguf = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = server.engine.tokenizer
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), dim=-1)  # [P, V]

    def check(lp, n_prompt):
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for p in range(1, n_prompt):
            assert lp.token_logprobs[p] == pytest.approx(ref[p - 1, ids[p]].item(), abs=1e-3)
            want = ref[p - 1].topk(2)
            assert len(lp.top_logprobs[p]) == 2
            assert sorted(lp.top_logprobs[p].values(), reverse=True) == pytest.approx(want.values.tolist(), abs=1e-3)

    scored = sdk.completions.create(model=server.model, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2, temperature=0)
    (choice,) = scored.choices
    assert choice.text == PROMPT and len(choice.logprobs.tokens) == len(ids) and scored.usage.completion_tokens == 0
    check(choice.logprobs, len(ids))
    both = sdk.completions.create(model=server.model, prompt=[ids], max_tokens=3, echo=True, logprobs=2, temperature=0, extra_body=FIXED)
    assert len(both.choices[0].logprobs.tokens) == len(ids) + 3
    check(both.choices[0].logprobs, len(ids))
    streamed = [c for c in sdk.completions.create(model=server.model, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2, stream=True)
                if c.choices and c.choices[0].logprobs]
    assert "".join(c.choices[0].text for c in streamed) == PROMPT
    assert [v for c in streamed for v in c.choices[0].logprobs.token_logprobs] == choice.logprobs.token_logprobs
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.completions.create(model=server.model, prompt=PROMPT, max_tokens=0)
    assert exc.value.param == "max_tokens"

    # vLLM's prompt_logprobs: {token id: {logprob, rank, decoded_token}} for the prompt token and its top k
    raw = sdk.completions.create(model=server.model, prompt=PROMPT, max_tokens=1, extra_body={"prompt_logprobs": 2}).model_dump()
    plp = raw["choices"][0]["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for p in range(1, len(ids)):
        mine = plp[p][str(ids[p])]
        assert mine["logprob"] == pytest.approx(ref[p - 1, ids[p]].item(), abs=1e-3)
        assert abs(mine["rank"] - (int((ref[p - 1] > ref[p - 1, ids[p]]).sum()) + 1)) <= 1  # (a float32 near-tie may swap)
        assert {int(t) for t in plp[p]} == {ids[p], *ref[p - 1].topk(2).indices.tolist()}
    chat = sdk.chat.completions.create(model=server.model, messages=MSGS, max_tokens=1, extra_body={"prompt_logprobs": 0}).model_dump()
    assert len(chat["prompt_logprobs"]) == len(rendered_prompt_ids(server, MSGS)) and chat["prompt_logprobs"][0] is None


def test_async_concurrent(server):
    """Several concurrent streams through the async SDK, batched by the engine, each as if alone."""
    import asyncio

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as client:
            async def one(i):
                s = await client.completions.create(model=server.model, prompt=f"{i} + {i} =", max_tokens=8, temperature=0, stream=True,
                                                    extra_body=FIXED)
                return "".join([c.choices[0].text async for c in s if c.choices])

            together = await asyncio.gather(*(one(i) for i in range(4)))
            alone = [await one(i) for i in (0, 3)]
            return together, alone

    together, alone = asyncio.run(main())
    assert all(together) and [together[0], together[3]] == alone


def test_errors_map_to_sdk_exceptions(sdk, server):
    with pytest.raises(openai.NotFoundError) as exc:
        sdk.models.retrieve("no-such-model")
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.completions.create(model=server.model, prompt=PROMPT, max_tokens=5000)
    assert exc.value.code == "context_length_exceeded" and exc.value.param == "max_tokens"
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_baseten_performance_client_batch_post(server):
    from baseten_performance_client import PerformanceClient

    client = PerformanceClient(base_url=server.url, api_key=API_KEY)
    payloads = [
        {"model": server.model, "messages": [{"role": "user", "content": f"Say the number {i}."}], "max_tokens": 4, "temperature": 0}
        for i in range(20)
    ]
    resp = client.batch_post("/v1/chat/completions", payloads)
    assert len(resp.data) == 20 and len(resp.response_headers) == 20
    for answer in resp.data:
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["message"]["content"]
        assert 0 < answer["usage"]["completion_tokens"] <= 4
    ids = {a["id"] for a in resp.data}
    assert len(ids) == 20
