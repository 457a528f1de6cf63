"""Penalties through the whole engine (persistent batch: counts kept incrementally, rows freed and rebuilt
on preemption) against transformers logits with the penalty formulas applied by hand."""

import torch

from ember import LLM, SamplingParams

PARAMS = [
    SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, presence_penalty=1.5, frequency_penalty=0.8),
    SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=1.8),
    SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, frequency_penalty=1.2, repetition_penalty=1.3),
]


def _reference(model, prompt: list[int], p: SamplingParams) -> list[int]:
    ids, out = list(prompt), []
    for _ in range(p.max_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double()  # [V]
        for t in set(out):
            logits[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
        for t in set(ids):
            logits[t] = logits[t] / p.repetition_penalty if logits[t] > 0 else logits[t] * p.repetition_penalty
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


def test_penalties_match_reference_under_preemption(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    # short prompts of few distinct ids: the penalties decide many of the tokens
    prompts = [torch.randint(3, 40, (int(n),), generator=g).tolist() for n in (9, 14, 6, 11, 17, 8, 12, 10)]
    params = [PARAMS[i % len(PARAMS)] for i in range(len(prompts))]
    # a small KV budget forces preemption (rows dropped, counts rebuilt from the resent outputs)
    busy = LLM(str(tiny_llama_dir), dtype="float32", max_num_tokens=16, batch_scheduler_policy="max_utilization",
               kv_cache_memory_bytes=7 * 2 * 2 * 16 * 2 * 16 * 4)  # 6 blocks of 16 tokens
    sched, preempted = busy.engine.scheduler, []
    preempt = sched._preempt
    sched._preempt = lambda req: (preempted.append(req.request_id), preempt(req))
    outs = busy.generate(prompts, params)
    assert preempted
    assert busy.engine.scheduler.block_manager.num_free_blocks == busy.engine.setup.num_kv_blocks
    for prompt, p, o in zip(prompts, params, outs):
        assert o.token_ids == _reference(ref, prompt, p)
