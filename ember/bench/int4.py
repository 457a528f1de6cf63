"""`ember bench int4`: the int4 CPU matmuls against the bf16 one, per batch size, on a model's Linear shapes.

For each number of rows it times, over every distinct (out, in) of the model's quantizable Linears: ember's int4
kernel (ember.layers.quant.int4_native, where this CPU has it: codes times activations in two int8 digits,
dequantize + GEMM from `GEMM_ROWS` rows), torch's int4 kernel, dequantize + GEMM (the two paths
`ember.layers.quant.int4_cpu` chooses between elsewhere) and the bf16 matmul an unquantized engine runs
(ember.layers.cpu_pack: AMX tiles where the CPU has them, else oneDNN's packed weight); the sum over one
forward's Linears is printed as a ratio to bf16. This is where
`int4_cpu.MAX_GEMV_ROWS` and `int4_native.GEMM_ROWS` come from.
"""

from __future__ import annotations

import time

import torch


def _bf16_matmul(dense: torch.Tensor):
    """x -> x @ dense.T the way a bf16 engine's Linear runs it on this CPU."""
    from ember.layers import cpu_pack

    if cpu_pack.can_tile(dense):
        tiled = cpu_pack.tile_bf16(dense)
        return lambda x: torch.ops.ember_cpu.bf16_linear(x, tiled, None)
    packed = torch.ops.mkldnn._reorder_linear_weight(dense, 1)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def add_args(p) -> None:
    p.add_argument("model", nargs="?", default=None, help="config, model dir, .gguf or engine dir (default model)")
    p.add_argument("--rows", default="1,2,4,8,12,16,32,64", help="comma-separated batch sizes")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)


def _time(fn, repeats: int) -> float:
    """Fastest of `repeats` calls after two warm-up calls (on a shared machine the minimum is the stable figure)."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def layer_shapes(model_source) -> dict[tuple[int, int], int]:
    """(out, in) -> how many Linears of one forward have it (the output head excluded)."""
    from ember.checkpoint import load_checkpoint, resolve_checkpoint_path
    from ember.config import load_config
    from ember.layers.linear import Linear
    from ember.models.registry import get_model_class

    ckpt = load_checkpoint(resolve_checkpoint_path(load_config(model_source).trt_llm.build.checkpoint_repository))
    with torch.device("meta"):
        model = get_model_class(ckpt.architecture)(ckpt.hf_config, dtype=torch.bfloat16, device="meta")
    counts: dict[tuple[int, int], int] = {}
    for path, m in model.named_modules():
        if isinstance(m, Linear) and not path.endswith("lm_head"):
            counts[(m.out_features, m.in_features)] = counts.get((m.out_features, m.in_features), 0) + 1
    return counts


def main(args) -> None:
    from ember.layers import cpu_kernels
    from ember.layers.quant import int4_cpu, int4_native

    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = layer_shapes(args.model)
    rows_list = [int(r) for r in args.rows.split(",")]
    torch.manual_seed(0)
    native = cpu_kernels.load() and args.group_size % int4_native.GROUP == 0
    totals = {r: {"ember int4": 0.0, "int4 kernel": 0.0, "dequant+GEMM": 0.0, "bf16": 0.0} for r in rows_list}
    for (out_f, in_f), count in shapes.items():
        codes = torch.randint(0, 16, (out_f, in_f), dtype=torch.uint8)
        scale = torch.rand(out_f, in_f // args.group_size) * 0.01
        kernel = int4_cpu.Int4CPUKernel.create(codes, scale, -8 * scale, args.group_size, torch.bfloat16)
        dense = kernel.dequantize(torch.bfloat16)
        bf16 = _bf16_matmul(dense)
        ours = int4_native.NativeInt4Kernel.create(codes, scale, -8 * scale, args.group_size) \
            if native and out_f % int4_native.BLOCK == 0 and in_f % 64 == 0 else None
        for rows in rows_list:
            x = torch.randn(rows, in_f, dtype=torch.bfloat16)
            t = totals[rows]
            if ours is not None:
                t["ember int4"] += count * _time(lambda: ours.matmul(x), args.repeats)
            t["int4 kernel"] += count * _time(lambda: torch._weight_int4pack_mm_for_cpu(
                x, kernel.packed, args.group_size, kernel.scale_zero), args.repeats)
            t["dequant+GEMM"] += count * _time(lambda: x @ kernel.dequantize_t(torch.bfloat16), args.repeats)
            t["bf16"] += count * _time(lambda: bf16(x), args.repeats)
    print(f"one forward's Linears ({sum(shapes.values())} of {len(shapes)} shapes), {torch.get_num_threads()} "
          f"threads; ms, and the ratio to bf16 (lower is faster); MAX_GEMV_ROWS = {int4_cpu.MAX_GEMV_ROWS}")
    print(f"{'rows':>5} {'ember int4':>18} {'torch int4':>18} {'dequant+GEMM':>18} {'bf16 engine':>12}")

    def col(t, name):
        return f" {'-':>18}" if not t[name] else f" {1e3 * t[name]:>10.2f} ({t[name] / t['bf16']:4.2f}x)"

    for rows in rows_list:
        t = totals[rows]
        cols = "".join(col(t, name) for name in ("ember int4", "int4 kernel", "dequant+GEMM"))
        print(f"{rows:>5}{cols} {1e3 * t['bf16']:>12.2f}")
