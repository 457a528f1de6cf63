"""Gemma 3's sliding-window layers keep only their window in a KV pool of their own (ember.core.window_blocks):
during a long generation the block manager's sliding blocks stay at about window / block_size while the global
layers' blocks grow with the length, and the greedy tokens still equal transformers'. A repeated prompt is served
from both pools' prefix caches (its early sliding blocks not needed), unchanged."""

import shutil

import torch

from ember import LLM, SamplingParams
from ember.core.block_manager import NULL_BLOCK
from ember.core.window_blocks import HybridBlockManager
from models_support import load_hf


def test_sliding_layers_free_blocks_outside_the_window(checkpoints, tiny_llama_dir, tmp_path):
    path = tmp_path / "gemma3"  # window 6, 3 layers (sliding, global, sliding)
    shutil.copytree(checkpoints["gemma3"], path)
    for f in tiny_llama_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, path / f.name)
    llm = LLM(str(path), dtype="float32", max_num_tokens=8, block_size=4, max_batch_size=4)
    bm = llm.engine.scheduler.block_manager
    assert isinstance(bm, HybridBlockManager) and bm.window.window == 6
    assert llm.engine.runner.kv_caches[0].shape[1] == bm.window.num_blocks != bm.full.num_blocks
    prompt = [5, 17, 90, 33, 4, 8, 9, 10, 11, 12, 13, 60, 61, 62]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    engine = llm.engine
    engine.add_request("long", prompt, params)
    req = engine.scheduler.requests["long"]
    held_window, held_full, released, tokens = [], [], [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens = out.outputs[0].token_ids
        held_window.append(bm.window.num_held_blocks)
        held_full.append(bm.full.num_blocks - bm.full.num_free_blocks)
        released.append(req.window_block_ids.count(NULL_BLOCK))  # its table's entries released so far
    # 77 positions get KV: the global blocks grow to 19-20; the sliding layers never hold more than the window's
    assert max(held_full) >= 19 and max(held_window) <= 6 // 4 + 3 and max(released) >= 19 - (6 // 4 + 3)
    with torch.no_grad():
        ref = load_hf(str(path), torch.float32).generate(torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64,
                                                         do_sample=False, pad_token_id=0)
    assert tokens == ref[0, len(prompt):].tolist()
    # a prefix hit takes the global blocks and, in the sliding pool, only the blocks inside the window at its end
    # (the long run above cycled the small sliding pool, so its own prompt's window blocks are gone)
    short = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    first = llm.generate([prompt[::-1]], short)[0]
    again = llm.generate([prompt[::-1]], short)[0]
    assert again.metrics.num_cached_tokens == 12 and again.token_ids == first.token_ids
