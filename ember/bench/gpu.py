"""`ember bench gpu`: decode and prefill speed of a published architecture with random weights, next to
transformers `generate` on the same model (same weights) and the device's measured limits, in one run.

Self-contained for a fresh GPU box with no network: the architecture is built from its published config
(kept here as dicts), transformers initializes random weights, and ember loads that state dict, so both
engines run identical weights. ember is driven at the model level, as its runner does it: paged KV cache,
the device's attention backend, CUDA graphs for decode steps (on CUDA), greedy argmax, and the sampled
tokens read back to the host each step (the one sync of a real engine step). The scheduler is not in
the loop. On CPU, `--arch tiny` smoke-tests the same code.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time

import torch

from ember.bench.hardware import copy_bandwidth_gbs, matmul_gflops
from ember.layers.attention import build_attention_metadata
from ember.models.registry import get_model_class
from ember.worker.kv_cache import allocate_kv_caches

_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# name -> (transformers config class, its published fields)
ARCHS: dict[str, tuple[str, dict]] = {
    "llama-3-8b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
        rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)),
    "qwen3-8b": ("Qwen3Config", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151645)),
    "tiny": ("LlamaConfig", dict(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16384, rms_norm_eps=1e-5, hidden_act="silu",
        rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
}


def make_config(arch: str):
    import transformers

    cls_name, fields = ARCHS[arch]
    cfg = getattr(transformers, cls_name)(**fields)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_models(arch: str, dtype: torch.dtype, device: torch.device, with_hf: bool = True, seed: int = 0):
    """(ember model, transformers model or None) holding the same random weights, on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM

    cfg = make_config(arch)
    torch.manual_seed(seed)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
        model = get_model_class(cfg.architectures[0] if cfg.architectures else
                                ARCHS[arch][0].replace("Config", "ForCausalLM"))(cfg, dtype=dtype, device=device)
    model.load_weights(hf.state_dict().items())
    model.eval()
    if not with_hf:
        del hf
        hf = None
    return model, hf


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EmberDriver:
    """A paged-KV greedy generation loop over one model, shaped like ModelRunner.execute."""

    def __init__(self, model, num_blocks: int, max_decode_len: int, max_batch: int, block_size: int,
                 use_graphs: bool):
        self.model, self.block_size, self.num_blocks = model, block_size, num_blocks
        self.device = next(model.parameters()).device
        # One extra block: the scratch block CUDA-graph padding rows write to.
        self.kv_caches = allocate_kv_caches(model.num_layers, num_blocks + 1, block_size, model.num_kv_heads,
                                            model.head_dim, model.dtype, self.device)
        self.graphs = None
        if use_graphs and self.device.type == "cuda":
            from ember.worker.cuda_graphs import CUDAGraphRunner, graph_buckets

            self.graphs = CUDAGraphRunner(model, self.kv_caches, block_size=block_size,
                                          max_blocks_per_seq=-(-max_decode_len // block_size),
                                          pad_block_id=num_blocks, buckets=graph_buckets(max_batch))
            t0 = time.perf_counter()
            self.graphs.capture()
            self.capture_s = time.perf_counter() - t0

    def _tables(self, batch: int, max_len: int, seed: int) -> list[list[int]]:
        ids = list(range(self.num_blocks))
        random.Random(seed).shuffle(ids)  # scattered blocks, as a long-running server has them
        per_seq = -(-max_len // self.block_size)
        if batch * per_seq > self.num_blocks:
            raise ValueError(f"{batch} sequences of {max_len} tokens need {batch * per_seq} KV blocks; "
                             f"the bench allocated {self.num_blocks}")
        return [ids[i * per_seq:(i + 1) * per_seq] for i in range(batch)]

    def _forward_sample(self, token_ids, positions, query_lens, seq_lens, tables) -> list[int]:
        """One step: forward, logits at each sequence's last token, greedy; the host read is the only sync."""
        run = None
        if self.graphs is not None and all(q == 1 for q in query_lens):
            meta = build_attention_metadata(query_lens, seq_lens, tables, self.block_size, "cpu")
            run = self.graphs.maybe_graph(meta)
        if run is not None:
            hidden = run(torch.tensor(token_ids), torch.tensor(positions))  # [B, H]
            last = hidden
        else:
            dev = self.device
            meta = build_attention_metadata(query_lens, seq_lens, tables, self.block_size, dev)
            ids = torch.tensor(token_ids, dtype=torch.int64).to(dev, non_blocking=True)
            pos = torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True)
            hidden = self.model(ids, pos, self.kv_caches, meta)  # [T, H]
            last = hidden.index_select(0, (meta.query_start_loc[1:] - 1).long())  # [B, H]
        return self.model.compute_logits(last).argmax(-1).tolist()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], output_len: int, max_num_tokens: int, seed: int = 0) -> dict:
        batch = len(prompts)
        tables = self._tables(batch, max(len(p) for p in prompts) + output_len, seed)
        _sync(self.device)
        t0 = time.perf_counter()
        first: list[int] = []
        i = 0
        while i < batch:  # prefill, whole prompts packed up to max_num_tokens per step
            j, num = i, 0
            while j < batch and (j == i or num + len(prompts[j]) <= max_num_tokens):
                num += len(prompts[j])
                j += 1
            chunk = prompts[i:j]
            first += self._forward_sample([t for p in chunk for t in p], [q for p in chunk for q in range(len(p))],
                                          [len(p) for p in chunk], [len(p) for p in chunk], tables[i:j])
            i = j
        t1 = time.perf_counter()
        outs = [[t] for t in first]
        lens = [len(p) for p in prompts]
        for _ in range(output_len - 1):
            last = [o[-1] for o in outs]
            positions = list(lens)
            lens = [n + 1 for n in lens]
            for o, t in zip(outs, self._forward_sample(last, positions, [1] * batch, lens, tables)):
                o.append(t)
        t2 = time.perf_counter()
        return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "token_ids": outs}


@torch.inference_mode()
def hf_generate(hf, prompts: list[list[int]], output_len: int) -> dict:
    """transformers generate (greedy, fixed length); its prefill time from a 1-token generate of the same batch."""
    dev = next(hf.parameters()).device
    ids = torch.tensor(prompts, dtype=torch.int64, device=dev)
    mask = torch.ones_like(ids)

    def gen(n):
        _sync(dev)
        t0 = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
        _sync(dev)
        return time.perf_counter() - t0, out

    gen(2)  # warm-up
    prefill_s, _ = gen(1)
    total_s, out = gen(output_len)
    decode_s = total_s - prefill_s  # noisy when the decode is short next to the prefill: NaN if meaningless
    return {"prefill_s": prefill_s, "total_s": total_s, "decode_s": decode_s if decode_s > 0 else float("nan"),
            "token_ids": out[:, ids.shape[1]:].tolist()}


@torch.inference_mode()
def hf_prefill(hf, prompts: list[list[int]]) -> float:
    dev = next(hf.parameters()).device
    ids = torch.tensor(prompts, dtype=torch.int64, device=dev)
    hf(input_ids=ids[:, :8], logits_to_keep=1)  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    hf(input_ids=ids, logits_to_keep=1, use_cache=False)
    _sync(dev)
    return time.perf_counter() - t0


def _prompts(vocab: int, batch: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, min(vocab, 32000)) for _ in range(length)] for _ in range(batch)]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=sorted(ARCHS), default="llama-3-8b")
    p.add_argument("--random-weights", action="store_true", default=True,
                   help="random weights from the built-in config (the only mode: no checkpoint is read)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--batch-sizes", default="1,8,64,256")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--prefill-len", type=int, default=1024)
    p.add_argument("--max-num-tokens", type=int, default=8192, help="tokens per prefill step")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--attention", choices=["auto", "torch", "triton"], default="auto")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--baseline", choices=["hf", "none"], default="hf")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")


def _set_attention(model, name: str) -> None:
    if name == "auto":
        return
    if name == "torch":
        from ember.layers.attention import TorchAttentionBackend as backend_cls
    else:
        from ember.layers.triton.backend import TritonAttentionBackend as backend_cls
    backend = backend_cls()
    for module in model.modules():
        if hasattr(module, "backend") and hasattr(module, "qkv_proj"):
            module.backend = backend


def main(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    on_gpu = device.type == "cuda"
    res: dict = {"arch": args.arch, "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
                 "dtype": str(dtype).replace("torch.", ""), "input_len": args.input_len,
                 "output_len": args.output_len, "cuda_graphs": on_gpu and not args.no_cuda_graphs}
    # Physical limits first, on a quiet device.
    res["copy_bandwidth_gbs"] = copy_bandwidth_gbs(num_bytes=(1 << 30) if on_gpu else (256 << 20), repeats=10,
                                                   device=str(device))
    res["matmul_tflops"] = matmul_gflops(dtype, n=8192 if on_gpu else 1024, repeats=10, device=str(device)) / 1e3

    model, hf = build_models(args.arch, dtype, device, with_hf=args.baseline == "hf", seed=args.seed)
    _set_attention(model, args.attention)
    res["attention"] = type(model.model.layers[0].self_attn.backend).__name__
    cfg = model.config
    vocab = cfg.vocab_size
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.model.embed_tokens.weight
    # A decode step reads every weight once, except the embedding table (one row per token) when untied.
    step_weight_bytes = params - (embed.numel() * embed.element_size() if model.lm_head is not None else 0)
    matmul_params = step_weight_bytes / dtype.itemsize
    kv_token_bytes = 2 * model.num_layers * model.num_kv_heads * model.head_dim * dtype.itemsize
    res["weight_bytes"] = params

    blocks = lambda n: -(-n // args.block_size)  # noqa: E731
    decode_len = args.input_len + args.output_len
    num_blocks = max(max(batch_sizes) * blocks(decode_len), args.prefill_batch * blocks(args.prefill_len + 1),
                     2 * blocks(20))  # the last: the warm-up below
    driver = EmberDriver(model, num_blocks, decode_len, max(batch_sizes), args.block_size,
                         use_graphs=not args.no_cuda_graphs)
    if driver.graphs is not None:
        res["graph_capture_s"] = driver.capture_s
        res["cuda_graphs"] = bool(driver.graphs.graphs)
    driver.generate(_prompts(vocab, 2, 16, args.seed), 4, args.max_num_tokens)  # warm-up (kernels, allocator)

    rows = []
    for b in batch_sizes:
        prompts = _prompts(vocab, b, args.input_len, args.seed + b)
        r = driver.generate(prompts, args.output_len, args.max_num_tokens, seed=b)
        steps = args.output_len - 1
        step_s = r["decode_s"] / max(1, steps)
        ctx = args.input_len + args.output_len / 2
        row = {"batch": b, "decode_tok_s": b * steps / r["decode_s"], "step_ms": 1e3 * step_s,
               "e2e_tok_s": b * args.output_len / (r["prefill_s"] + r["decode_s"]),
               "bandwidth_share": (step_weight_bytes + b * ctx * kv_token_bytes) / step_s / (res["copy_bandwidth_gbs"] * 1e9),
               "matmul_share": 2 * matmul_params * b / step_s / (res["matmul_tflops"] * 1e12),
               "_ids": r["token_ids"], "_prompts": prompts}
        rows.append(row)
    pf_prompts = _prompts(vocab, args.prefill_batch, args.prefill_len, args.seed + 7)
    pf = driver.generate(pf_prompts, 1, args.max_num_tokens)
    pf = min(pf["prefill_s"], driver.generate(pf_prompts, 1, args.max_num_tokens)["prefill_s"])
    res["prefill"] = {"batch": args.prefill_batch, "len": args.prefill_len,
                      "ember_tok_s": args.prefill_batch * args.prefill_len / pf}
    del driver
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()

    if hf is not None:
        for row in rows:
            h = hf_generate(hf, row["_prompts"], args.output_len)
            steps = args.output_len - 1
            row["hf_decode_tok_s"] = row["batch"] * steps / h["decode_s"]
            row["hf_e2e_tok_s"] = row["batch"] * args.output_len / h["total_s"]
            same = [a == b for a, b in zip(row["_ids"][0], h["token_ids"][0])]
            row["greedy_prefix_match"] = (same + [False]).index(False)  # leading tokens equal to transformers
        res["prefill"]["hf_tok_s"] = args.prefill_batch * args.prefill_len / min(
            hf_prefill(hf, pf_prompts) for _ in range(2))
    res["decode"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    print_table(res)
    if args.json:
        print(json.dumps(res, indent=2))
    return res


def print_table(res: dict) -> None:
    print(f"\n{res['arch']} (random weights)  {res['device']}  {res['dtype']}  attention {res['attention']}  "
          f"CUDA graphs {'on' if res['cuda_graphs'] else 'off'}  {res['input_len']} in / {res['output_len']} out")
    print(f"device limits: copy {res['copy_bandwidth_gbs']:.0f} GB/s (read+write), "
          f"{res['dtype']} matmul {res['matmul_tflops']:.3g} TFLOP/s; weights {res['weight_bytes'] / 1e9:.2f} GB")
    has_hf = "hf_decode_tok_s" in res["decode"][0]
    head = f"{'batch':>6}{'ember decode tok/s':>20}{'step ms':>9}{'% bw':>7}{'% matmul':>10}{'ember e2e tok/s':>17}"
    if has_hf:
        head += f"{'hf decode tok/s':>17}{'hf e2e tok/s':>14}{'decode x':>10}{'same greedy':>13}"
    print(head)
    for r in res["decode"]:
        line = (f"{r['batch']:>6}{r['decode_tok_s']:>20.1f}{r['step_ms']:>9.2f}{100 * r['bandwidth_share']:>6.0f}%"
                f"{100 * r['matmul_share']:>9.1f}%{r['e2e_tok_s']:>17.1f}")
        if has_hf:
            line += (f"{r['hf_decode_tok_s']:>17.1f}{r['hf_e2e_tok_s']:>14.1f}"
                     f"{r['decode_tok_s'] / r['hf_decode_tok_s']:>9.2f}x{r['greedy_prefix_match']:>13}")
        print(line)
    pf = res["prefill"]
    line = f"prefill {pf['batch']} x {pf['len']} tokens: ember {pf['ember_tok_s']:.0f} tok/s"
    if "hf_tok_s" in pf:
        line += f", transformers {pf['hf_tok_s']:.0f} tok/s ({pf['ember_tok_s'] / pf['hf_tok_s']:.2f}x)"
    print(line)
    print("% bw: batch-1..N decode bytes per step (weights + KV read) / step time, of the measured copy bandwidth; "
          "% matmul: 2 * weights * batch FLOPs per step, of the measured matmul throughput; "
          "same greedy: leading tokens of sequence 0 equal to transformers'.")
