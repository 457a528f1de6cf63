"""`ember bench offline --speculator ...`: speculative decoding vs plain decoding on the same engine, in
the same run. Reports tokens per forward step (deterministic), acceptance rate, wall-clock speedup,
and checks that greedy outputs are token-for-token identical.

Plain decoding is the same engine with speculation switched off per request (W=0, G=0, no prompt
lookup), so weights, threads and KV cache are the same; the two runs alternate `--repeats` times and
the best time of each is kept (the machine is shared and noisy).
"""

from __future__ import annotations

import time

from ember.sampling_params import SamplingParams

_NO_SPEC = dict(lookahead_windows_size=0, lookahead_verification_set_size=0, enable_b10_lookahead=False)

_CODE = '''import json
from dataclasses import dataclass


@dataclass
class User:
    name: str
    email: str
    age: int

    def to_dict(self) -> dict:
        return {"name": self.name, "email": self.email, "age": self.age}


@dataclass
class Order:
    order_id: int
    user: User
    total: float

    def to_dict(self) -> dict:
        return {"order_id": self.order_id, "user": self.user.to_dict(), "total": self.total}
'''

_JSON = ('[{"id": 1, "name": "Alice Smith", "email": "alice@example.com", "city": "Paris", "active": true},\n'
         ' {"id": 2, "name": "Bob Jones", "email": "bob@example.com", "city": "Rome", "active": false},\n'
         ' {"id": 3, "name": "Carol White", "email": "carol@example.com", "city": "Berlin", "active": true}]')

_TEXT = ("The committee met on Tuesday to review the budget for the coming year. After a long discussion, "
         "members agreed to increase funding for the library and the public parks, and to reduce spending "
         "on consultants. The final vote will take place next month.")

WORKLOADS = {
    # code and JSON: the answer re-uses names, keys and whole lines of the prompt
    "code": [
        "Add a class Product with fields product_id, title and price, written in the same style as this "
        "code, then a to_dict method for it:\n\n" + _CODE,
        "Rewrite this code with a docstring on every class and method:\n\n" + _CODE,
        "Convert this JSON to YAML:\n\n" + _JSON,
        "Add a field \"country\" to every record of this JSON and print the full result:\n\n" + _JSON,
    ],
    # repetitive: the answer is mostly a copy of the prompt
    "repeat": [
        "Repeat the following text exactly, twice:\n\n" + _TEXT,
        "Copy this list, one item per line, adding a dash before each:\napples\npears\nplums\ncherries\n"
        "grapes\nlemons\noranges\npeaches",
        "Repeat exactly: " + _CODE[:300],
        "Write the word 'hello' followed by a number, counting from 1 to 30, one per line.",
    ],
}


# W, N, G when the command line leaves them open. A GPU verifies wide trees for free; on a CPU every draft
# token costs matrix work, so a narrow Jacobi window and two short candidates give more tokens per second:
# one code prompt in float32 (W, N, G -> speedup over plain): (1, 4, 2) 1.28-1.42x, (1, 3, 2) 1.27x,
# (1, 6, 1) 1.28x, (1, 6, 3) 1.07x, (2, 5, 2) 1.05x (tokens per step are printed by `--speculator lookahead`).
DEFAULT_SIZES = {"cuda": (4, 4, 4), "cpu": (1, 4, 2)}


def speculator_config(kind: str, args) -> dict:
    import torch

    w, n, g = DEFAULT_SIZES["cuda" if torch.cuda.is_available() else "cpu"]
    w, n, g = (v if v is not None else d for v, d in zip(
        (args.lookahead_window, args.lookahead_ngram, args.lookahead_verify), (w, n, g)))
    spec = dict(speculative_decoding_mode="LOOKAHEAD_DECODING", lookahead_windows_size=w,
                lookahead_ngram_size=n, lookahead_verification_set_size=g,
                enable_b10_lookahead=kind in ("prompt_lookup", "both"))
    if kind == "prompt_lookup":  # the chain's length is N - 1
        spec["lookahead_ngram_size"] = args.num_draft + 1
    return spec


def request_overrides(kind: str) -> dict:
    return dict(lookahead_windows_size=0, lookahead_verification_set_size=0) if kind == "prompt_lookup" else {}


def workload_prompts(llm, workload: str, num_prompts: int) -> list[list[int]]:
    from ember.server.chat import ChatRenderer
    from ember.server.protocol import ChatMessage

    texts = WORKLOADS[workload]
    texts = [texts[i % len(texts)] for i in range(num_prompts)]
    renderer = ChatRenderer(llm.tokenizer, llm.chat_template)
    rendered = [renderer.render([ChatMessage.model_validate({"role": "user", "content": t})],
                                add_generation_prompt=True) for t in texts]
    return [llm.tokenizer.encode(r, add_special_tokens=False) for r in rendered]


def _run(llm, prompts, params) -> tuple[float, list]:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - t0, outs


def run_spec_bench(llm, prompts: list[list[int]], output_len: int, kind: str, repeats: int) -> dict:
    plain_p = SamplingParams(max_tokens=output_len, temperature=0.0, **_NO_SPEC)
    spec_p = SamplingParams(max_tokens=output_len, temperature=0.0, **request_overrides(kind))
    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    best_plain = best_spec = float("inf")
    for _ in range(repeats):
        t, plain = _run(llm, prompts, plain_p)
        best_plain = min(best_plain, t)
        t, spec = _run(llm, prompts, spec_p)
        best_spec = min(best_spec, t)
    num_out = sum(len(o.token_ids) for o in spec)
    steps = sum(o.metrics.num_decode_steps for o in spec)
    drafts = sum(o.metrics.num_draft_tokens for o in spec)
    accepted = sum(o.metrics.num_accepted_tokens for o in spec)
    identical = [a.token_ids == b.token_ids for a, b in zip(plain, spec)]
    return {"speculator": kind, "num_prompts": len(prompts), "output_tokens": num_out,
            "plain_s": best_plain, "spec_s": best_spec, "speedup": best_plain / best_spec,
            "plain_tok_s": sum(len(o.token_ids) for o in plain) / best_plain, "spec_tok_s": num_out / best_spec,
            "tokens_per_step": num_out / max(1, steps), "draft_tokens": drafts, "accepted_tokens": accepted,
            "acceptance_rate": accepted / drafts if drafts else 0.0,
            "per_request_tokens_per_step": [round(o.metrics.mean_tokens_per_step or 0, 2) for o in spec],
            "identical": all(identical), "num_identical": sum(identical)}


def print_spec_table(res: dict, workload: str) -> None:
    print(f"\nspeculator {res['speculator']}  workload {workload}  {res['num_prompts']} prompts, "
          f"{res['output_tokens']} output tokens")
    print(f"{'run':<10}{'out tok/s':>12}{'elapsed s':>12}")
    print(f"{'plain':<10}{res['plain_tok_s']:>12.1f}{res['plain_s']:>12.2f}")
    print(f"{'spec':<10}{res['spec_tok_s']:>12.1f}{res['spec_s']:>12.2f}")
    print(f"tokens per forward step {res['tokens_per_step']:.2f}  (per request {res['per_request_tokens_per_step']})")
    print(f"acceptance rate {res['acceptance_rate']:.2f} ({res['accepted_tokens']}/{res['draft_tokens']} drafts)  "
          f"speedup {res['speedup']:.2f}x  greedy outputs identical: {res['num_identical']}/{res['num_prompts']}")
