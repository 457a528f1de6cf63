"""`ember bench serve`: load against an OpenAI-compatible server, like vLLM's benchmark_serving.

N prompts of a fixed input length go to /v1/completions (token-id prompts, exact lengths) or
/v1/chat/completions (text of about that many tokens) as SSE streams with fixed output lengths
(`ignore_eos` and `min_tokens`, which ember and vLLM accept), at each of the given concurrency
levels and, optionally, a Poisson request rate. Per request: TTFT (send to first text), ITL (gaps
between text chunks), TPOT ((latency - TTFT) / (output tokens - 1)) and end-to-end latency; per
level: their mean/p50/p90/p99, request and token throughput, and goodput (requests/s meeting
--slo-ttft-ms and --slo-tpot-ms). `--launch` starts `ember serve` (the default model) on a free
port for the run and stops it afterwards. `--plot` writes a PNG (ember.bench.plots)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx

WORDS = ("the of and to in is was for on that with as by at from his her an it are this be which or had not were "
         "but they have one all their there been has when who will more no if out so said what up its about into "
         "than them can only other new some could time these two may then do first any my now such like our over "
         "man me even most made after also did many before must through back years where much your way well down").split()
PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """What one request saw, in seconds from the moment it was sent."""

    is_success: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)  # gaps between successive text chunks
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


# ---- workload -------------------------------------------------------------------------------------


def make_prompts(http: httpx.Client, model: str, num_prompts: int, input_len: int, seed: int) -> list[list[int] | str]:
    """`num_prompts` prompts of exactly `input_len` token ids when the server has /tokenize (ember,
    vLLM), else texts of `input_len` common words (about one token each)."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(input_len * 2)) for _ in range(num_prompts)]
    root = str(http.base_url).rstrip("/").removesuffix("/v1")
    try:
        prompts = []
        for text in texts:
            r = http.post(f"{root}/tokenize", json={"model": model, "prompt": text, "add_special_tokens": False})
            r.raise_for_status()
            prompts.append(r.json()["tokens"][:input_len])
        return prompts
    except (httpx.HTTPError, KeyError, ValueError):
        return [" ".join(t.split()[:input_len]) for t in texts]


def request_body(endpoint: str, model: str, prompt, output_len: int, tokenizer_text) -> dict:
    fixed = {"model": model, "max_tokens": output_len, "min_tokens": output_len, "ignore_eos": True, "temperature": 0.0,
             "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "completions":
        return {"prompt": prompt, **fixed}
    text = prompt if isinstance(prompt, str) else tokenizer_text(prompt)
    return {"messages": [{"role": "user", "content": text}], **fixed}


async def send_one(http: httpx.AsyncClient, path: str, body: dict, is_chat: bool) -> RequestResult:
    res = RequestResult()
    start = last = time.perf_counter()
    num_chunks = 0
    try:
        async with http.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error event")
                    return res
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if is_chat else choice.get("text")
                    if not text:
                        continue
                    now = time.perf_counter()
                    if num_chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itls.append(now - last)
                    last = now
                    num_chunks += 1
        res.latency = time.perf_counter() - start
        res.output_tokens = res.output_tokens or num_chunks
        res.is_success = num_chunks > 0
        if not res.is_success:
            res.error = "the stream carried no text"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def run_level(url: str, headers: dict, path: str, bodies: list[dict], concurrency: int, request_rate: float,
                    seed: int, show_progress: bool) -> tuple[list[RequestResult], float]:
    """All bodies at `concurrency` in flight at most, arriving as a Poisson process of `request_rate`
    per second (inf: all at once). Returns the results and the wall time."""
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    semaphore = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(bodies), desc=f"concurrency {concurrency}", disable=not show_progress, file=sys.stderr)
    is_chat = path.endswith("chat/completions")
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=httpx.Timeout(None, connect=30)) as http:

        async def one(body: dict) -> RequestResult:
            async with semaphore:
                res = await send_one(http, path, body, is_chat)
            bar.update(1)
            return res

        start = time.perf_counter()
        tasks = []
        for body in bodies:
            tasks.append(asyncio.ensure_future(one(body)))
            if math.isfinite(request_rate):
                await asyncio.sleep(rng.expovariate(request_rate))  # the arrival process, not synchronization
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    bar.close()
    return list(results), elapsed


# ---- metrics --------------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(results: list[RequestResult], elapsed: float, concurrency: int, slo_ttft_ms, slo_tpot_ms) -> dict:
    ok = [r for r in results if r.is_success]
    out = {"concurrency": concurrency, "num_requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
           "duration_s": elapsed, "total_input_tokens": sum(r.prompt_tokens for r in ok),
           "total_output_tokens": sum(r.output_tokens for r in ok)}
    out["request_throughput"] = len(ok) / elapsed
    out["output_throughput"] = out["total_output_tokens"] / elapsed
    out["total_token_throughput"] = (out["total_input_tokens"] + out["total_output_tokens"]) / elapsed
    series = {"ttft_ms": [r.ttft * 1e3 for r in ok], "tpot_ms": [r.tpot * 1e3 for r in ok if r.tpot is not None],
              "itl_ms": [x * 1e3 for r in ok for x in r.itls], "e2el_ms": [r.latency * 1e3 for r in ok]}
    for name, values in series.items():
        out[f"mean_{name}"] = sum(values) / len(values) if values else None
        for p in PERCENTILES:
            out[f"p{p}_{name}"] = percentile(values, p)
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        good = [r for r in ok if (slo_ttft_ms is None or r.ttft * 1e3 <= slo_ttft_ms)
                and (slo_tpot_ms is None or r.tpot is None or r.tpot * 1e3 <= slo_tpot_ms)]
        out["goodput"] = len(good) / elapsed
    else:
        out["goodput"] = None
    errors = [r.error for r in results if not r.is_success]
    out["errors"] = sorted(set(errors))[:5]
    return out


TABLE_ROWS = [
    ("completed / failed", lambda s: f"{s['completed']} / {s['failed']}"),
    ("duration (s)", "duration_s"),
    ("request throughput (req/s)", "request_throughput"),
    ("output throughput (tok/s)", "output_throughput"),
    ("total throughput (tok/s)", "total_token_throughput"),
    ("goodput (req/s)", "goodput"),
] + [(f"{label} {stat} (ms)", f"{stat}_{key}") for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E latency"))
     for stat in ("mean", "p50", "p90", "p99")]


def format_table(summaries: list[dict], header: str) -> str:
    width = 12
    lines = [header, f"{'concurrency':<30}" + "".join(f"{s['concurrency']:>{width}}" for s in summaries)]
    for label, key in TABLE_ROWS:
        cells = []
        for s in summaries:
            value = key(s) if callable(key) else s.get(key)
            cells.append(f"{'-' if value is None else (value if isinstance(value, str) else f'{value:.2f}'):>{width}}")
        lines.append(f"{label:<30}" + "".join(cells))
    return "\n".join(lines)


# ---- launching a server ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def launched_server(config: str | None, timeout_s: float = 300.0):
    """`ember serve` (the default model, or `config`) on a free loopback port; yields its /v1 URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "ember.cli", "serve", "--host", "127.0.0.1", "--port", str(port)] + ([config] if config else [])
    log = tempfile.NamedTemporaryFile("w+", prefix="ember-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    print(f"launched `{' '.join(cmd[2:])}` (pid {proc.pid}, log {log.name})", file=sys.stderr)
    is_ok = False
    try:
        deadline = time.monotonic() + timeout_s
        while True:  # bounded polling for readiness: the server loads its model first
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"ember serve exited with {proc.returncode}:\n{log.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"ember serve did not become healthy within {timeout_s:.0f} s (log {log.name})")
            time.sleep(0.5)
        yield f"{url}/v1"
        is_ok = True
    finally:
        proc.terminate()  # SIGTERM: the server drains and exits
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    if is_ok:  # the log is kept only when something went wrong
        os.unlink(log.name)


# ---- command --------------------------------------------------------------------------------------


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI base URL (ending in /v1)")
    p.add_argument("--launch", action="store_true", help="start `ember serve` on a free port for the run (ignores --url)")
    p.add_argument("--launch-config", default=None, help="with --launch: the config/model to serve (default: the default model)")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument("--api-key", default=None, help="Bearer token, when the server wants one")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1], help="one run per level: requests in flight at most")
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (default: inf, all at once)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput counts requests with TTFT at most this")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput counts requests with TPOT at most this")
    p.add_argument("--plot", default=None, help="write a PNG of throughput and latency percentiles vs concurrency here")
    p.add_argument("--json", action="store_true", help="print machine-readable results")
    p.add_argument("--vs-offline", action="store_true",
                   help="with --launch: first run the same engine offline at each concurrency as batch size, then compare")


def main(args: argparse.Namespace) -> dict:
    offline = None
    if getattr(args, "vs_offline", False):
        if not args.launch:
            raise SystemExit("--vs-offline needs --launch (the offline run must use the served engine's config)")
        from ember.bench.serve_offline import offline_levels

        offline = offline_levels(args.launch_config, args.concurrency, args.input_len, args.output_len, args.seed)
    if args.launch:
        with launched_server(args.launch_config) as url:
            res = run(args, url)
    else:
        res = run(args, args.url)
    if offline is not None:
        from ember.bench.serve_offline import format_comparison

        print(format_comparison(res["levels"], offline))
        res["offline"] = offline
    return res


def run(args: argparse.Namespace, url: str) -> dict:
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        model = args.model or http.get("/models").raise_for_status().json()["data"][0]["id"]
        prompts = make_prompts(http, model, args.num_prompts, args.input_len, args.seed)
        root = url.removesuffix("/v1")

        def detokenize(ids: list[int]) -> str:
            return http.post(f"{root}/detokenize", json={"model": model, "tokens": ids}).raise_for_status().json()["prompt"]

        bodies = [request_body(args.endpoint, model, p, args.output_len, detokenize) for p in prompts]
    path = "/completions" if args.endpoint == "completions" else "/chat/completions"
    show_progress = sys.stderr.isatty()
    # warm-up (not measured): the first request pays for lazy initialisation on the server
    asyncio.run(run_level(url, headers, path, bodies[:1], 1, math.inf, args.seed, False))
    summaries = []
    for concurrency in args.concurrency:
        results, elapsed = asyncio.run(run_level(url, headers, path, bodies, concurrency, args.request_rate, args.seed, show_progress))
        summaries.append(summarize(results, elapsed, concurrency, args.slo_ttft_ms, args.slo_tpot_ms))
    rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g}/s"
    header = (f"\n{url}  model {model}  /{args.endpoint}  {args.num_prompts} prompts x ({args.input_len} in, {args.output_len} out)  "
              f"request rate {rate}")
    print(format_table(summaries, header))
    for s in summaries:
        if s["errors"]:
            print(f"concurrency {s['concurrency']}: {s['failed']} failed, e.g. {s['errors'][0]}", file=sys.stderr)
    res = {"url": url, "model": model, "endpoint": args.endpoint, "num_prompts": args.num_prompts, "input_len": args.input_len,
           "output_len": args.output_len, "request_rate": None if math.isinf(args.request_rate) else args.request_rate,
           "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms, "levels": summaries}
    if args.plot:
        from ember.bench.plots import plot_serve

        plot_serve(summaries, args.plot, f"{model}: {args.num_prompts} x ({args.input_len} in, {args.output_len} out)")
        print(f"plot written to {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps(res, indent=2))
    return res

