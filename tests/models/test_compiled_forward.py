"""The compiled CPU forward (ember.compile): torch.compile over the layers with paged attention opaque.
float32 greedy output through the engine stays identical to transformers and to the eager engine, over
prefill, batched decode and single-token decode (the two compiled graphs)."""

import pytest
import torch

from ember import LLM, SamplingParams


def test_compiled_engine_greedy_matches_transformers_and_eager(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    compiled = LLM(str(tiny_llama_dir), dtype="float32", compile=True)
    if compiled.engine.runner.compiled is None:
        pytest.fail("the compiled forward did not build (see the warning in the log)")
    prompts = [[5, 17, 900, 33, 4], [7, 7, 1200], [40000, 12, 13, 14, 15, 16, 17]]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    outs = compiled.generate(prompts, params)  # mixed prefill + batched decode: the many-token graph
    alone = compiled.generate([prompts[1]], params)[0].token_ids  # batch-1 decode: the one-token graph
    eager = LLM(str(tiny_llama_dir), dtype="float32")
    assert [o.token_ids for o in outs] == [o.token_ids for o in eager.generate(prompts, params)]
    assert alone == outs[1].token_ids
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            r = ref.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None)
        assert o.token_ids == r[0, len(p):].tolist()


@pytest.mark.parametrize("kernel", ["amx", "onednn"])
def test_compiled_engine_builds_in_bf16_with_packed_linears(tiny_llama_dir, kernel, monkeypatch):
    """bf16 on CPU re-lays every Linear for its kernel (ember.layers.cpu_pack: AMX tiles, or oneDNN's packed
    layout); the graph must take those weights. Calling `mkldnn._linear_pointwise` from the graph directly fails
    Inductor's lowering on a cold compile, and the runner then falls back to eager with only a log line: this
    catches that."""
    from ember.layers import cpu_kernels
    from ember.layers.cpu_pack import AMXMethod, PackedCPUMethod, can_pack

    if kernel == "amx" and not cpu_kernels.amx_available():
        pytest.skip("this CPU (or its kernel) gives no AMX")
    if kernel == "onednn":
        if not can_pack(torch.device("cpu"), torch.bfloat16):
            pytest.skip("oneDNN bf16 is not supported on this CPU: nothing is packed")
        monkeypatch.setattr("ember.layers.cpu_pack.can_tile", lambda w: False)
    llm = LLM(str(tiny_llama_dir), dtype="bfloat16", compile=True)
    runner = llm.engine.runner
    method = AMXMethod if kernel == "amx" else PackedCPUMethod
    assert any(isinstance(getattr(m, "quant_method", None), method) for m in runner.model.modules())
    if runner.compiled is None:
        pytest.fail("the compiled forward did not build (see the warning in the log)")
    out = llm.generate([[5, 17, 900, 33, 4]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 6
