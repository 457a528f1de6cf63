"""`ember bench offline --task embed`: N inputs of a fixed token length through ember's encoder engine
(token-budget batches on its own thread, as the server runs them) and through transformers (one padded-free
batch of the same inputs, same dtype, then the same pooling) in the same run; prints embeddings/s and the ratio, by wall clock and by CPU time (the latter is steadier on a
machine shared with other work). `--hf-dtype float32` compares with transformers' default precision.

The model is an encoder config / model dir, or (none given) BERT-base's shape (bert-base-uncased's config)
with random weights: weights' values don't change speed. Outputs are compared (cosine) so the two runs are
known to compute the same thing."""

from __future__ import annotations

import asyncio
import json
import random
import time

import torch
import torch.nn.functional as F

BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 max_position_embeddings=512, type_vocab_size=2)


def _synthetic(dtype: torch.dtype):
    """(hf model, ember EncoderSetup) for BERT-base's shape with random weights, mean pooling + normalize."""
    from transformers import BertConfig, BertModel

    from ember.encoder.models import build_encoder_model, load_encoder_weights
    from ember.encoder.pooling import PoolingConfig
    from ember.encoder.runner import EncoderRunner
    from ember.encoder.setup import EncoderSetup

    torch.manual_seed(0)
    hf_config = BertConfig(**BERT_BASE)
    hf = BertModel(hf_config, add_pooling_layer=False).eval()
    model, spec = build_encoder_model("BertModel", hf_config, dtype, "cpu")
    load_encoder_weights(model, "BertModel", hf.state_dict().items())
    pooling = PoolingConfig("mean", True, "bench")
    setup = EncoderSetup(None, None, EncoderRunner(model, spec, pooling, torch.device("cpu")), spec, pooling,
                         hf_config.hidden_size, hf_config.max_position_embeddings, torch.device("cpu"), dtype)
    return hf.to(dtype), setup


def _from_checkpoint(source, dtype_name: str):
    from transformers import AutoModel

    from ember.config import load_config
    from ember.encoder.setup import build_encoder_setup

    cfg = load_config(source, dtype=dtype_name)
    setup = build_encoder_setup(cfg)
    hf = AutoModel.from_pretrained(setup.checkpoint.path, dtype=setup.dtype).eval()
    return hf, setup, cfg


def _hf_embed(hf, ids: torch.Tensor, mode: str, normalize: bool) -> torch.Tensor:
    """ids [B, L] (no padding) -> pooled [B, H] float32, as sentence-transformers pools."""
    with torch.inference_mode():
        hidden = hf(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.float()  # [B, L, H]
    pooled = {"mean": lambda h: h.mean(1), "cls": lambda h: h[:, 0], "last": lambda h: h[:, -1], "max": lambda h: h.amax(1)}[mode](hidden)
    return F.normalize(pooled, dim=-1) if normalize else pooled


def run_embed_bench(args) -> dict:
    from ember.config import load_config
    from ember.encoder.engine import EncoderEngine
    from ember.encoder.runner import EncoderInput
    from ember.worker.device import resolve_dtype

    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    if args.model is None:
        hf, setup = _synthetic(dtype)
        cfg = load_config({"model_name": "bert-base-shape", "trt_llm": {"build": {"base_model": "encoder_bert"}}})
        name = "BERT-base shape (random weights)"
    else:
        hf, setup, cfg = _from_checkpoint(args.model, args.dtype)
        name = str(setup.checkpoint.path)
    if args.input_len > setup.max_model_len:
        raise SystemExit(f"--input-len {args.input_len} is above the model's limit of {setup.max_model_len} tokens")
    rng = random.Random(args.seed)
    vocab = min(int(hf.config.vocab_size), 30000)
    ids = torch.tensor([[rng.randrange(vocab // 10 + 1, vocab) for _ in range(args.input_len)] for _ in range(args.num_prompts)])
    hf_dtype = resolve_dtype(args.hf_dtype, torch.device("cpu")) if args.hf_dtype else setup.dtype
    hf = hf.to(hf_dtype)
    engine = EncoderEngine(cfg, setup=setup)
    items = [EncoderInput(row.tolist()) for row in ids]

    loop = asyncio.new_event_loop()
    loop.run_until_complete(engine.start())
    ember_s = hf_s = ember_cpu = hf_cpu = float("inf")
    ember_out = hf_out = None
    try:
        loop.run_until_complete(engine.encode(items[:1]))  # warm-up
        _hf_embed(hf, ids[:1], setup.pooling.mode, setup.pooling.normalize)
        for _ in range(args.repeats):  # interleaved, best of each: load from other processes hits both alike
            t0, c0 = time.perf_counter(), time.process_time()
            ember_out = loop.run_until_complete(engine.encode(items))
            ember_s, ember_cpu = min(ember_s, time.perf_counter() - t0), min(ember_cpu, time.process_time() - c0)
            t0, c0 = time.perf_counter(), time.process_time()
            hf_out = _hf_embed(hf, ids, setup.pooling.mode, setup.pooling.normalize)
            hf_s, hf_cpu = min(hf_s, time.perf_counter() - t0), min(hf_cpu, time.process_time() - c0)
    finally:
        loop.run_until_complete(engine.shutdown())
        loop.close()
    cosine = F.cosine_similarity(ember_out, hf_out, dim=-1).min().item()
    res = {"model": name, "dtype": str(dtype).replace("torch.", ""), "num_inputs": args.num_prompts, "input_len": args.input_len,
           "threads": torch.get_num_threads(), "ember_embeddings_s": args.num_prompts / ember_s,
           "hf_embeddings_s": args.num_prompts / hf_s, "ratio": hf_s / ember_s, "min_cosine": cosine,
           "ember_tokens_s": args.num_prompts * args.input_len / ember_s, "hf_dtype": str(hf_dtype).replace("torch.", ""),
           "cpu_time_ratio": hf_cpu / ember_cpu}
    print(f"embed: {name}, {args.num_prompts} inputs x {args.input_len} tokens, {res['dtype']}, {res['threads']} threads")
    print(f"  ember         {res['ember_embeddings_s']:8.2f} embeddings/s  ({res['ember_tokens_s']:.0f} tokens/s)")
    print(f"  transformers  {res['hf_embeddings_s']:8.2f} embeddings/s  ({res['hf_dtype']})")
    print(f"  ratio {res['ratio']:.2f}x wall, {res['cpu_time_ratio']:.2f}x CPU time   (min cosine ember vs transformers {cosine:.6f})")
    if args.json:
        print(json.dumps(res, indent=2))
    return res
