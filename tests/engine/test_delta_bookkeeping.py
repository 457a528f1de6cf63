"""A step's bookkeeping does not grow with how long a request has run (STYLE habit 14): the core's delta
extraction, the front end's accumulation/detokenization/stop-string check and a streaming reader's
`text_from`/`logprobs[sent:]` allocate the same at output length 4096 as at 64. Measured as the memory a
step allocates at its peak (tracemalloc), the median over 32 steps: a copy of a 4k-token history (32 KB of
ids, 4 KB of text) would show; no wall clock is involved."""

from __future__ import annotations

import statistics
import tracemalloc

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ember.core.block_manager import BlockManager
from ember.core.scheduler import Scheduler
from ember.engine.core import EngineCore
from ember.engine.messages import EngineCoreRequest
from ember.engine.output_processor import OutputProcessor
from ember.outputs import TokenLogprob
from ember.sampling_params import SamplingParams
from ember.spec import NoSpeculator
from ember.structured.manager import StructuredOutputManager
from ember.worker.model_runner import ModelRunnerOutput


def _tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level, no merges: one token per byte, every text round-trips."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _core() -> EngineCore:
    """An EngineCore over a real scheduler; the model is replaced by the sampled ids we choose."""
    core = EngineCore.__new__(EngineCore)
    core.scheduler = Scheduler(BlockManager(600, 16, False), max_num_tokens=256, max_batch_size=4, max_seq_len=8192)
    core.structured = StructuredOutputManager.__new__(StructuredOutputManager)  # advancing needs no grammar backend
    core.speculator = NoSpeculator()
    core.stats_generation_tokens = core.stats_draft_tokens = core.stats_accepted_tokens = 0
    return core


def _step_peaks(num_warm: int, num_measured: int = 32) -> list[int]:
    tok = _tokenizer()
    letters = [tok.encode(c)[0] for c in "abcdefgh "]
    core, front = _core(), OutputProcessor(tok)
    params = SamplingParams(max_tokens=num_warm + num_measured + 1, ignore_eos=True, logprobs=1, stop=["zzz", "q!"])
    core.scheduler.add_request(_request(params))
    front.add_request("r", None, [1, 2, 3], params, set(), 0.0)
    sent_chars = sent_logprobs = 0
    peaks = []
    for step in range(num_warm + num_measured):
        sched_out = core.scheduler.schedule()
        token = letters[step % len(letters)]
        runner_out = ModelRunnerOutput(sampled_token_ids={"r": [token]},
                                       logprobs={"r": [TokenLogprob(token, -0.5, [(token, -0.5)])]})
        num_before = {"r": sched_out.scheduled[0].request.num_output_tokens}
        core.scheduler.update(sched_out, runner_out.sampled_token_ids)
        is_measured = step >= num_warm
        if is_measured:
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
        deltas = core._outputs(sched_out, runner_out, num_before, float(step))  # the core's half of the step
        (out,) = front.process(deltas, float(step)).request_outputs  # the front end's half
        comp = out.outputs[0]
        new_text, new_logprobs = comp.text_from(sent_chars), comp.logprobs[sent_logprobs:]  # a streaming reader
        sent_chars, sent_logprobs = comp.num_chars, sent_logprobs + len(new_logprobs)
        if is_measured:
            peaks.append(tracemalloc.get_traced_memory()[1] - base)
            tracemalloc.stop()
        assert len(comp.token_ids) == step + 1 and new_text
    assert comp.text == "".join("abcdefgh "[i % 9] for i in range(num_warm + num_measured))  # nothing lost
    return peaks


def _request(params: SamplingParams):
    from ember.core.request import Request

    r = EngineCoreRequest("r", [1, 2, 3], params, set(), params.max_tokens, 0.0)
    return Request(request_id=r.request_id, prompt_token_ids=r.prompt_token_ids, sampling_params=params,
                   eos_token_ids=r.eos_token_ids, max_tokens=r.max_tokens, arrival_time=r.arrival_time)


def test_step_bookkeeping_does_not_grow_with_output_length():
    short = statistics.median(_step_peaks(64))
    long = statistics.median(_step_peaks(4096))
    # a copied 4k history would add >= 4 KB (its text) or 32 KB (its ids); allow allocator noise only
    assert long <= short + 512, f"a step allocates {long} bytes at 4096 output tokens vs {short} at 64"
