"""The playground at / in a real headless Chromium (Playwright driving the system's chromium) against a tiny
model with a LoRA adapter, behind an API key: the page lists the adapters from /v1/models, streams a chat reply
over SSE with tokens/s shown live, and its text equals the official openai client's for the same request;
a JSON schema in its box gives a reply that validates; bad input shows the server's error. A screenshot of
the page is saved under the test's tmp_path."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from ember.checkpoint.default import default_model_path
from ember.config import load_config
from ember.engine.async_engine import AsyncLLM
from ember.server.app import create_app
from ember.server.playground import FILES, PLAYGROUND_DIR
from live_server import LiveServer, running

API_KEY = "playground-key"
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
          "additionalProperties": False}
WAIT_MS = 30_000  # a bound on waiting for the page, never a synchronization sleep


def make_adapter(out_dir: Path) -> Path:
    """A small random PEFT adapter (q/v, rank 4) for the default model's architecture."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf = default_model_path()
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The default model (SmolLM2-135M-Instruct: real words in the screenshot) with adapter `sql`, behind a key."""
    adapter = make_adapter(tmp_path_factory.mktemp("pg_adapter") / "sql")
    # no prefix cache: the openai client's repeat of the page's request runs the very same computation (greedy ties)
    cfg = load_config(None, dtype="bfloat16", max_seq_len=1024, api_key=API_KEY, enable_prefix_caching=False,
                      lora_adapters={"sql": {"source": "LOCAL", "repo": str(adapter)}})
    with running(LiveServer(create_app(AsyncLLM(cfg), cfg), stop_timeout_s=30.0)) as live:
        yield live


def test_page_is_served_from_the_package_without_the_key(server):
    for path, (name, media_type) in FILES.items():
        resp = httpx.get(server.url + path)  # no Authorization: the files hold no secret
        assert resp.status_code == 200 and resp.headers["content-type"] == media_type
        assert resp.content == (PLAYGROUND_DIR / name).read_bytes()
        assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//|url\(\s*["']?(https?:)?//|@import""", resp.text)  # no CDN
    assert httpx.get(server.url + "/v1/models").status_code == 401  # the API still wants the key


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium browser on this machine (`make` installs Debian's "
                                             "chromium where apt-get is available)")
def test_streamed_chat_in_headless_chromium(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(server.url + "/")
            page.fill("#api-key", API_KEY)
            page.dispatch_event("#api-key", "change")
            expect(page.locator("#model option")).to_have_count(2, timeout=WAIT_MS)
            base = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"][0]["id"]
            assert page.locator("#model option").all_inner_texts() == [base, f"sql (LoRA on {base})"]
            page.select_option("#model", "sql")
            page.fill("#system", "You are terse.")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "16")
            # every text the stats line shows, as the page sets it (the live figures are replaced quickly)
            page.evaluate("""() => { window.statsSeen = [];
                new MutationObserver((records) => { for (const r of records) for (const n of r.addedNodes)
                    window.statsSeen.push(n.textContent); }).observe(document.getElementById('stats'), {childList: true}); }""")
            page.fill("#prompt", "Write a haiku about embers.")
            page.press("#prompt", "Enter")
            reply = page.locator(".message.assistant[data-done='true']").first
            expect(reply).to_be_visible(timeout=WAIT_MS)
            text = reply.locator(".content").text_content()
            stats = page.locator("#stats").inner_text()
            assert re.fullmatch(r"16 tokens · \d+\.\d tok/s · first token \d+ ms", stats), stats
            assert any(re.match(r"~\d+ tokens · \d+\.\d tok/s", s) for s in page.evaluate("window.statsSeen")), \
                "tokens/s was not shown while streaming"
            assert reply.locator(".meta").inner_text() == "sql · finish: length"

            sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
            ref = sdk.chat.completions.create(model="sql", temperature=0, max_tokens=16, messages=[
                {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Write a haiku about embers."}])
            assert text == ref.choices[0].message.content and len(text.split()) >= 5

            page.fill("#schema", json.dumps(SCHEMA))
            page.fill("#max-tokens", "48")
            page.fill("#prompt", "Is fire hot? Answer in JSON.")
            page.click("#send")
            second = page.locator(".message.assistant[data-done='true']").nth(1)
            expect(second).to_be_visible(timeout=WAIT_MS)
            jsonschema.validate(json.loads(second.locator(".content").inner_text()), SCHEMA)
            assert second.locator(".meta").inner_text() == "sql · finish: stop · valid JSON"
            page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)

            page.fill("#schema", "{not json")
            page.fill("#prompt", "again")
            page.click("#send")
            expect(page.locator("#error")).to_have_text(re.compile(r"^JSON schema: not valid JSON"), timeout=WAIT_MS)
            page.fill("#schema", "")
            page.fill("#max-tokens", "0")
            page.fill("#prompt", "again")
            page.click("#send")
            expect(page.locator("#error")).to_contain_text("max_tokens", timeout=WAIT_MS)  # the server's 400, in the page
        finally:
            browser.close()
    shot = tmp_path / "playground.png"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"playground screenshot: {shot}")
