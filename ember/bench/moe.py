"""`ember bench moe`: mixture-of-experts decode speed. A tiny-ish Mixtral with random weights (weights' values don't
change speed) is written to a temporary directory with the default model's tokenizer, then `ember bench offline
--batch-sizes` runs it: output tok/s of ember and of transformers `generate` at each batch size, in the same run."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def write_random_mixtral(path: Path, *, hidden_size: int, intermediate_size: int, num_layers: int, num_experts: int,
                         top_k: int, vocab_size: int, seed: int = 0) -> Path:
    """A MixtralForCausalLM checkpoint (safetensors, config, tokenizer) with random weights at `path`."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from ember.checkpoint.default import default_model_path

    cfg = transformers.MixtralConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=8, num_key_value_heads=2, num_local_experts=num_experts,
        num_experts_per_tok=top_k, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    transformers.MixtralForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    gguf = default_model_path()
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(path)
    return path


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=512, help="per expert")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], metavar="B")
    p.add_argument("--num-prompts", type=int, default=32, help="run B at a time at each batch size B")
    p.add_argument("--input-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", action="store_true", help="print machine-readable results")


def main(args: argparse.Namespace) -> dict:
    from ember.bench import offline

    parser = argparse.ArgumentParser()
    offline.add_args(parser)
    with tempfile.TemporaryDirectory(prefix="ember-bench-moe-") as tmp:
        path = write_random_mixtral(Path(tmp) / "mixtral", hidden_size=args.hidden_size,
                                    intermediate_size=args.intermediate_size, num_layers=args.num_layers,
                                    num_experts=args.num_experts, top_k=args.top_k, vocab_size=args.vocab_size)
        print(f"Mixtral (random weights): hidden {args.hidden_size}, {args.num_experts} experts of "
              f"{args.intermediate_size}, top-{args.top_k}, {args.num_layers} layers, {args.dtype}")
        off = parser.parse_args([str(path), "--batch-sizes", *map(str, args.batch_sizes), "--num-prompts",
                                 str(args.num_prompts), "--input-len", str(args.input_len), "--output-len",
                                 str(args.output_len), "--dtype", args.dtype, "--max-batch-size",
                                 str(max(args.batch_sizes))] + (["--json"] if args.json else []))
        return offline.main(off)
