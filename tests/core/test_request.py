"""Request and RequestStatus basics, and the no-torch rule for ember.core."""

import subprocess
import sys

from ember.core import Request, RequestStatus
from ember.sampling_params import SamplingParams


def test_core_imports_no_torch():
    code = ("import sys, ember.core, ember.core.request, ember.core.block_manager, ember.core.scheduler, "
            "ember.core.outputs; assert 'torch' not in sys.modules, 'ember.core imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_status_finish_reasons():
    assert not RequestStatus.RUNNING.is_finished and not RequestStatus.PREEMPTED.is_finished
    assert RequestStatus.FINISHED_STOPPED.finish_reason == "stop"
    assert RequestStatus.FINISHED_LENGTH.finish_reason == "length"
    assert RequestStatus.FINISHED_ABORTED.finish_reason == "abort"
    assert RequestStatus.WAITING.finish_reason is None


def test_tokens_and_drafts():
    r = Request("a", [1, 2, 3], SamplingParams(max_tokens=5), eos_token_ids={0})
    assert r.max_tokens == 5 and r.eos_token_ids == {0} and r.status == RequestStatus.WAITING
    r.append_output_token_ids(4)
    r.append_output_token_ids([5, 6])
    assert r.all_token_ids == [1, 2, 3, 4, 5, 6] and r.output_token_ids == [4, 5, 6]
    assert (r.num_tokens, r.num_prompt_tokens, r.num_output_tokens) == (6, 3, 3)
    r.spec_token_ids = [7, 8]
    assert r.num_known_tokens == 8
    assert r.token_ids_slice(5, 8) == [6, 7, 8] and r.token_ids_slice(6, 8) == [7, 8]
    assert r.token_ids_slice(0, 2) == [1, 2]


def test_ignore_eos_and_unset_max_tokens():
    r = Request("a", [1], SamplingParams(max_tokens=None, ignore_eos=True), eos_token_ids={0})
    assert r.eos_token_ids == set() and r.max_tokens is None
