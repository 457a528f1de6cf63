"""ember's C++ CPU kernels (ember/csrc) against float64 references built independently of them: the int4
matmul (ember.layers.quant.int4_native), the 8-bit LM head (ember.layers.cpu_pack.q8_grid) and decode
attention (ember.layers.batched_attention). The kernels are optional (other CPUs use the torch paths); on a
CPU without AVX-512 VNNI/BF16/VBMI or without a compiler these tests are skipped, and the first one says why."""

import pytest
import torch

from ember.layers import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.load(), reason="ember's CPU kernels are not available here")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


# ---- int4 ---------------------------------------------------------------------------------------------------
def _int4_case(out_f, in_f, group_size, scale_dtype):
    from ember.layers.quant.int4 import Int4Method

    torch.manual_seed(0)
    method = Int4Method(group_size, scale_dtype)
    stored = method.quantize(torch.randn(out_f, in_f) * 0.05)
    dense = method.dequantize_stored(stored["weight"], stored["weight_scale"], stored["weight_min"]).double()
    return method, stored, dense


@pytest.mark.parametrize("group_size,scale_dtype", [(32, "float16"), (32, "float32"), (128, "float16")])
def test_int4_kernel_matches_the_dequantized_weight_at_every_row_count(group_size, scale_dtype):
    from ember.layers.linear import Linear
    from ember.layers.quant.int4_native import GEMM_ROWS, NativeInt4Kernel

    method, stored, dense = _int4_case(96, 256, group_size, scale_dtype)
    layer = Linear(256, 96, dtype=torch.bfloat16)
    layer.set_quant_method(method, torch.bfloat16, "cpu")
    for key, t in stored.items():
        getattr(layer, key).data.copy_(t)
    layer.process_weights_after_loading()
    assert isinstance(layer.cpu_kernel, NativeInt4Kernel)
    assert torch.equal(method.dequantize(layer), dense.float())  # the layout round-trips the exact grid
    torch.manual_seed(1)
    for rows in (1, 2, 3, 4, 5, 9, GEMM_ROWS - 1, GEMM_ROWS, GEMM_ROWS + 7):  # tiles of 4/2/1, and the GEMM path
        x = torch.randn(rows, 256, dtype=torch.bfloat16)
        got = layer(x)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, 96)
        # bf16 output rounding alone is 2^-9; activations in two int8 digits add far less than that
        assert rel_err(got, x.double() @ dense.t()) < 8e-3, rows


def test_int4_kernel_rows_do_not_depend_on_their_batch():
    from ember.layers.quant.int4_native import GEMM_ROWS, NativeInt4Kernel

    torch.manual_seed(0)
    codes = torch.randint(0, 16, (64, 128), dtype=torch.uint8)
    scale = (torch.rand(64, 4) * 0.01).half()
    kernel = NativeInt4Kernel.create(codes, scale, -8 * scale, 32)
    assert torch.equal(kernel.codes(), codes)
    x = torch.randn(GEMM_ROWS - 1, 128, dtype=torch.bfloat16)
    batch = kernel.matmul(x)
    for i in (0, 5, GEMM_ROWS - 2):  # the row alone, and inside a tile of 4, 2 or 1
        assert torch.equal(kernel.matmul(x[i:i + 1]), batch[i:i + 1])


@pytest.mark.skipif(not cpu_kernels.amx_available(), reason="this CPU (or its kernel) gives no AMX")
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_int4_amx_gemm_equals_bf16_matmul_on_the_dequantized_weight(scale_dtype):
    """From GEMM_ROWS rows, bf16 activations run on AMX with the weight dequantized into tiles in cache: the
    same weights as ember_cpu::int4_dequantize, rows independent of their batch."""
    from ember.layers.quant.int4_native import NativeInt4Kernel

    torch.manual_seed(0)
    codes = torch.randint(0, 16, (112, 96), dtype=torch.uint8)  # 7 blocks of 16 outputs: groups of 4 and of 3
    scale = (torch.rand(112, 3) * 0.01).to(scale_dtype)
    kernel = NativeInt4Kernel.create(codes, scale, -7 * scale, 32)
    dense = torch.ops.ember_cpu.int4_dequantize(kernel.packed, kernel.scale, kernel.minimum)
    x = torch.randn(40, 96, dtype=torch.bfloat16)
    full = torch.ops.ember_cpu.int4_linear(x, kernel.packed, kernel.scale, kernel.minimum, 0)  # always the GEMM
    want = x.double() @ dense.double().t()
    assert rel_err(full, want) < 2 ** -8
    for rows in (1, 16, 17, 33):
        assert torch.equal(torch.ops.ember_cpu.int4_linear(x[:rows], kernel.packed, kernel.scale, kernel.minimum, 0),
                           full[:rows]), rows


def test_int4_activation_outliers_keep_their_group_precise():
    """One value 1000x the others in a group: a single int8 digit would round the rest to 0 (llama.cpp's Q8
    activations lose them); the second digit keeps them."""
    from ember.layers.quant.int4_native import NativeInt4Kernel

    torch.manual_seed(0)
    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    scale = torch.full((32, 2), 0.01, dtype=torch.float16)
    kernel = NativeInt4Kernel.create(codes, scale, torch.zeros_like(scale), 32)
    x = torch.randn(1, 64) * 0.01
    x[0, 3] = 10.0  # the outlier, in group 0
    x[0, 32:] = 0  # group 1 silent: the output is group 0's
    w = codes.double() * 0.01
    want = x.double() @ w.t()
    small = x.clone()
    small[0, 3] = 0  # the small values' share alone, which one digit would lose entirely
    share = (small.double() @ w.t()).abs().max().item()
    got = torch.ops.ember_cpu.int4_linear(x, kernel.packed, kernel.scale, kernel.minimum, 1 << 30)  # float32 out
    assert (got.double() - want).abs().max().item() < 0.1 * share  # one digit: about 1.0 * share


# ---- 8-bit LM head ------------------------------------------------------------------------------------------
def _q8_source(rows=256, cols=128):
    """A Q8_0-quantized matrix (llama.cpp's rounding: d = absmax / 127 in float16), as bf16 holds it."""
    torch.manual_seed(0)
    src = torch.randn(rows, cols // 32, 32) * 0.02
    d = (src.abs().amax(-1, keepdim=True) / 127).half().float()
    exact = ((src / d).round().clamp(-127, 127) * d).view(rows, cols).double()
    return exact.bfloat16(), exact


def test_q8_grid_is_found_on_8bit_weights_only():
    from ember.layers.cpu_pack import q8_grid

    weight, _ = _q8_source()
    assert q8_grid(weight) is not None
    assert q8_grid(torch.randn(256, 128, dtype=torch.bfloat16)) is None  # never was 8-bit
    assert q8_grid(weight[:, :120]) is None  # does not tile


def test_int8_head_is_closer_to_the_source_than_bf16_is():
    from ember.layers.cpu_pack import q8_grid

    weight, exact = _q8_source()
    codes, scale = q8_grid(weight)
    torch.manual_seed(1)
    for rows in (1, 3, 4, 6):
        x = torch.randn(rows, 128)
        want = x.double() @ exact.t()
        got = torch.ops.ember_cpu.int8_linear(x, codes, scale)  # float32 out: the kernel's own error
        assert rel_err(got, want) <= rel_err(x.double() @ weight.double().t(), want)
        one = torch.ops.ember_cpu.int8_linear(x[-1:].contiguous(), codes, scale)
        assert torch.equal(one[0], got[-1])


def test_tied_8bit_head_replaces_the_packed_bf16_copy():
    from ember.layers.cpu_pack import Q8HeadMethod, pack_model_for_cpu

    weight, _ = _q8_source(512, 64)
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.embed_tokens = torch.nn.Embedding(512, 64, _weight=weight.clone())
    model.lm_head = None
    pack_model_for_cpu(model)
    assert isinstance(model.lm_head.quant_method, Q8HeadMethod)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert rel_err(model.lm_head(x), x.double() @ weight.double().t()) < 8e-3


# ---- decode attention ---------------------------------------------------------------------------------------
# ---- bf16 linears on AMX tiles --------------------------------------------------------------------------------
@pytest.mark.skipif(not cpu_kernels.amx_available(), reason="this CPU (or its kernel) gives no AMX")
@pytest.mark.parametrize("out_f,in_f", [(1728, 576), (48, 1536), (16, 32)])  # 4-tile groups; a 3-tile group; one
def test_bf16_amx_linear_matches_float64_and_every_row_is_batch_invariant(out_f, in_f):
    from ember.layers.cpu_pack import tile_bf16

    torch.manual_seed(0)
    w, b = (torch.randn(out_f, in_f) * in_f ** -0.5).bfloat16(), torch.randn(out_f).bfloat16()
    x = torch.randn(70, in_f).bfloat16()
    want = x.double() @ w.double().t() + b.double()
    tiled = tile_bf16(w)
    full = torch.ops.ember_cpu.bf16_linear(x, tiled, b)
    # bf16 output: half an ulp of rounding (2^-9 relative) on top of the fp32 sum's error
    torch.testing.assert_close(full.double(), want, rtol=2 ** -8, atol=1e-3)
    no_bias = torch.ops.ember_cpu.bf16_linear(x, tiled, None)
    torch.testing.assert_close(no_bias.double(), want - b.double(), rtol=2 ** -8, atol=1e-3)
    for rows in (1, 2, 15, 16, 17, 33, 64, 70):  # one row, partial and whole 16-row blocks
        part = torch.ops.ember_cpu.bf16_linear(x[:rows], tiled, b)
        assert torch.equal(part, full[:rows]), rows  # a row's result does not depend on its batch
    assert torch.equal(torch.ops.ember_cpu.bf16_linear(x[69:70], tiled, b), full[69:70])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 1, 128), (4, 4, 32)])
def test_decode_attention_matches_the_matmul_chain(dtype, tol, window, heads, kv_heads, head_dim):
    from ember.layers.batched_attention import attend_batch, plan_batch

    torch.manual_seed(0)
    num_blocks, block_size = 40, 16
    cache = torch.randn(2, kv_heads, num_blocks, block_size, head_dim, dtype=dtype).permute(0, 2, 3, 1, 4)
    lens = [1, 17, 100, 33]
    tables = torch.randperm(num_blocks)[:32].view(4, 8).int()  # padded past the longest: the plan slices it
    q = torch.randn(4, heads, head_dim, dtype=dtype)
    plan = plan_batch([0, 1, 2, 3], [0, 1, 2, 3, 4], [1, 1, 1, 1], lens, tables, block_size, None, window, dtype, "cpu")
    assert plan.block_tables.stride(0) == 8 and plan.block_tables.shape[1] == 7  # a strided view reaches the kernel
    kernel = attend_batch(q, cache, plan, head_dim ** -0.5, None, None)
    chain = attend_batch(q, cache, plan, head_dim ** -0.5, None, None, fused=False)
    assert torch.allclose(kernel.float(), chain.float(), atol=tol, rtol=0)


# ---- float32 linears of a few rows --------------------------------------------------------------------------
@pytest.mark.parametrize("out_f,in_f", [(96, 576), (7, 40)])  # a whole number of tiles; and tails everywhere
def test_f32_linear_matches_float64_and_every_row_is_batch_invariant(out_f, in_f):
    from ember.layers.cpu_kernels import F32_MAX_ROWS, linear

    torch.manual_seed(0)
    w, b = torch.randn(out_f, in_f), torch.randn(out_f)
    x = torch.randn(F32_MAX_ROWS, in_f)
    want = x.double() @ w.double().t() + b.double()
    for rows in range(1, F32_MAX_ROWS + 1):
        got = torch.ops.ember_cpu.f32_linear(x[:rows], w, b)
        assert rel_err(got, want[:rows]) < 1e-6, rows
        assert torch.equal(got[-1], torch.ops.ember_cpu.f32_linear(x[rows - 1:rows], w, b)[0])  # alone = in a batch
    assert torch.equal(linear(x[:3], w, b), torch.ops.ember_cpu.f32_linear(x[:3], w, b))  # the dispatcher takes it
    many = torch.randn(F32_MAX_ROWS + 1, in_f)
    assert torch.equal(linear(many, w, b), torch.nn.functional.linear(many, w, b))  # past the limit: the BLAS call
    # the op itself too (a compiled graph calls it at every row count)
    assert torch.equal(torch.ops.ember_cpu.f32_linear(many, w, b), torch.nn.functional.linear(many, w, b))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_tree_verification_attention_matches_the_matmul_chain(dtype, tol):
    """Speculative verification (draft trees: a random ancestor mask per request, unequal sizes, padded):
    ember_cpu::masked_attention, straight from the paged cache with the plan's mask, against the chain over
    the gathered K/V."""
    from ember.layers.batched_attention import attend_batch, plan_batch

    torch.manual_seed(0)
    num_blocks, block_size, heads, kv_heads, head_dim = 40, 16, 9, 3, 64
    cache = torch.randn(2, kv_heads, num_blocks, block_size, head_dim, dtype=dtype).permute(0, 2, 3, 1, 4)
    q_lens, ctx = [5, 3, 6], [20, 47, 90]
    seq_lens = [c + n for c, n in zip(ctx, q_lens)]
    tree = torch.zeros(sum(q_lens), 6, dtype=torch.bool)
    row = 0
    for n in q_lens:
        for t in range(n):
            tree[row, t] = True  # itself
            parent = int(torch.randint(0, t, (1,))) if t else None
            while parent is not None:  # and its ancestors
                tree[row, parent] = True
                parent = int(torch.randint(0, parent, (1,))) if parent else None
            row += 1
    tables = torch.randperm(num_blocks)[:21].view(3, 7).int()
    starts = [0, 5, 8, 14]
    q = torch.randn(sum(q_lens), heads, head_dim, dtype=dtype)
    plan = plan_batch([0, 1, 2], starts, q_lens, seq_lens, tables, block_size, tree, None, dtype, "cpu")
    assert plan.num_queries == 6
    kernel = attend_batch(q, cache, plan, head_dim ** -0.5, None, None)
    assert plan.uses_kernel and plan.visible is not None  # the C++ kernel ran, not SDPA
    chain = attend_batch(q, cache, plan, head_dim ** -0.5, None, None, fused=False)
    real = plan.out_slots  # padding slots attend to anything finite; only real ones are compared
    assert torch.allclose(kernel[real].float(), chain[real].float(), atol=tol, rtol=0)
