"""group_quantize_ref / group_dequantize_ref against a plain per-group loop, round-trip bounds, zero groups."""

import pytest
import torch

from fastlayers.reference.quantize import group_dequantize_ref, group_quantize_ref, group_scales_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]


def _loop_quantize(x, num_groups, num_bits):
    """One group at a time, scalar maths in Python floats where it is exact (absmax, the fp32 scale)."""
    flat = x.reshape(-1).float()
    k = flat.numel() // num_groups
    lo, hi = -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
    codes, scales = [], []
    for gi in range(num_groups):
        group = flat[gi * k : (gi + 1) * k]
        absmax = max(abs(group.min().item()), abs(group.max().item()))
        scale = torch.tensor(absmax, dtype=torch.float32) * 2.0 / 2**num_bits
        div = scale if scale != 0 else torch.tensor(1.0)
        codes.append(torch.clamp(torch.round(group / div), lo, hi))
        scales.append(scale)
    return torch.cat(codes).to(torch.int8).reshape(x.shape), torch.stack(scales)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_bits", [8, 4, 2])
@pytest.mark.parametrize("shape,num_groups", [((8, 6), 8), ((8, 6), 4), ((12, 5), 3), ((4, 3, 10), 1), ((30,), 5)])
def test_matches_per_group_loop(dtype, num_bits, shape, num_groups):
    x = (torch.randn(shape) * 3).to(dtype)
    q, scale = group_quantize_ref(x, num_groups, num_bits)
    q_loop, scale_loop = _loop_quantize(x, num_groups, num_bits)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (num_groups,)
    assert torch.equal(scale, scale_loop)
    assert torch.equal(q, q_loop)
    assert int(q.min()) >= -(2 ** (num_bits - 1)) and int(q.max()) <= 2 ** (num_bits - 1) - 1


def test_scale_is_absmax_over_128_for_8_bits():
    x = torch.tensor([[1.0, -4.0, 2.0], [0.5, 0.25, -0.125]])
    q, scale = group_quantize_ref(x, 2)
    assert torch.equal(scale, torch.tensor([4.0 / 128, 0.5 / 128]))
    # -absmax is exactly -128; +absmax would be 128 and is clamped to 127
    assert q[0].tolist() == [32, -128, 64]
    assert q[1].tolist() == [127, 64, -32]
    assert torch.equal(group_scales_ref(x, 2), scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_bits", [8, 4])
def test_round_trip_error_is_at_most_half_a_step(dtype, num_bits):
    """|x - q·scale| <= scale/2, except where round(x/scale) is clamped at the top code 2**(bits-1) - 1
    (x above (top + 0.5)·scale, e.g. the group's +absmax): there the error is at most one step."""
    g = 16
    x = (torch.randn(g, 33) * torch.logspace(-3, 3, g)[:, None]).to(dtype)
    q, scale = group_quantize_ref(x, g, num_bits)
    xd = group_dequantize_ref(q, scale, torch.float64)
    s = scale.double()[:, None]
    err = (x.double() - xd).abs()
    top = 2 ** (num_bits - 1) - 1
    clamped = x.double() > (top + 0.5) * s
    bound = torch.where(clamped, s, s / 2) * (1 + 1e-6)
    assert (err <= bound).all(), f"max err/scale = {(err / s).max().item()}"
    assert clamped.any()  # the positive absmax of some group lands there


def test_all_zero_group_gives_zero_scale_and_codes_and_no_nan():
    x = torch.randn(4, 8)
    x[1] = 0.0
    q, scale = group_quantize_ref(x, 4)
    assert scale[1] == 0 and (q[1] == 0).all()
    assert torch.isfinite(scale).all()
    xd = group_dequantize_ref(q, scale)
    assert torch.isfinite(xd).all() and (xd[1] == 0).all()
    q0, s0 = group_quantize_ref(torch.zeros(2, 3, dtype=torch.float16), 2)
    assert torch.equal(q0, torch.zeros(2, 3, dtype=torch.int8)) and torch.equal(s0, torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=DTYPE_IDS)
def test_dequantize_matches_loop_and_dtype(dtype):
    q = torch.randint(-128, 128, (6, 10), dtype=torch.int8)
    scale = torch.rand(3) / 100
    out = group_dequantize_ref(q, scale, dtype)
    assert out.dtype == dtype and out.shape == q.shape
    want = torch.cat([q.reshape(3, -1)[i].double() * scale[i].double() for i in range(3)]).reshape(6, 10)
    assert torch.allclose(out.double(), want, rtol=1e-2 if dtype != torch.float64 else 1e-7, atol=0)
    assert torch.equal(group_dequantize_ref(q, scale), (q.reshape(3, -1).float() * scale[:, None]).reshape(6, 10))


def test_groups_are_consecutive_row_major_runs():
    """G = 2 over a (4, 3) tensor: rows 0-1 are group 0, rows 2-3 group 1; a non-contiguous input is read in
    its logical (row-major) order."""
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    _, scale = group_quantize_ref(x, 2)
    assert torch.allclose(scale, torch.tensor([6.0, 0.6]) / 128)
    xt = x.t().contiguous().t()  # same values, column-major storage
    assert torch.equal(group_quantize_ref(xt, 2)[0], group_quantize_ref(x, 2)[0])
