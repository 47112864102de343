"""GroupQuantizer (DeepSpeed's API and `.scale` layout), group_dequantize and quantized_linear."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastlayers.functional.quantize import GroupQuantizer, group_dequantize, quantized_linear
from fastlayers.reference.quantize import group_quantize_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def _absmax_scales(t, num_groups, num_bits=8):
    """Per-group scales written out with Python floats: max |v| of each run of numel/G elements · 2 / 2**bits."""
    flat = t.reshape(-1).double().tolist()
    k = len(flat) // num_groups
    return [
        float(torch.tensor(max(abs(v) for v in flat[i * k : (i + 1) * k]), dtype=torch.float32) * 2.0 / 2**num_bits)
        for i in range(num_groups)
    ]


def _deepspeed_layout(w, num_groups, parallel_dim=0, num_bits=8):
    """Expected `.scale` built by hand: the flat list [all groups, half-0 groups, half-1 groups] read as (G, 3)."""
    n = w.shape[parallel_dim] // 2
    h0, h1 = w.narrow(parallel_dim, 0, n), w.narrow(parallel_dim, n, n)
    flat = _absmax_scales(w, num_groups, num_bits) + _absmax_scales(h0, num_groups, num_bits)
    flat += _absmax_scales(h1, num_groups, num_bits)
    return torch.tensor(flat, dtype=torch.float32).reshape(num_groups, 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_default_quantizer_one_group_per_row(dtype):
    w = (torch.randn(8, 12) * 2).to(dtype)
    p = GroupQuantizer().quantize(w)
    assert isinstance(p, nn.Parameter) and not p.requires_grad
    assert p.dtype == torch.int8 and p.shape == w.shape and p.device == w.device
    q, s = group_quantize_ref(w, 8)
    assert torch.equal(p.data, q)
    assert p.scale.shape == (8, 3) and p.scale.dtype == torch.float32
    assert torch.equal(p.scale, _deepspeed_layout(w, 8))
    assert torch.equal(p.scale.reshape(-1)[:8], s)


def test_scale_layout_is_a_reshape_not_a_transpose():
    """Row i of `.scale` is not (all_i, half0_i, half1_i): the (3, G) block is reinterpreted as (G, 3)."""
    w = torch.randn(6, 4)
    w[0, 0] = 10.0  # group 0 (row 0), half 0 group 0 (first 2 elements of row 0)
    w[4, 3] = -20.0  # group 4 (row 4); element 7 of half 1 (rows 3-5), so half 1 group 3
    p = GroupQuantizer().quantize(w)
    all_, h0, h1 = p.scale.reshape(3, 6)  # DeepSpeed's cat of [1, G] rows
    assert all_[0] == 10.0 / 128 and all_[4] == 20.0 / 128
    assert h0[0] == 10.0 / 128 and h1[3] == 20.0 / 128
    # memory order [all_ (6), h0 (6), h1 (6)] read as (6, 3): rows 0-1 hold all_, rows 2-3 h0, rows 4-5 h1
    assert torch.equal(p.scale[0], all_[0:3]) and torch.equal(p.scale[2], h0[0:3]) and torch.equal(p.scale[5], h1[3:6])
    assert not torch.equal(p.scale, torch.stack([all_, h0, h1], dim=1))


@pytest.mark.parametrize("parallel_dim", [0, 1, -1])
def test_half_scales_along_parallel_dim(parallel_dim):
    w = torch.randn(4, 10)
    p = GroupQuantizer().quantize(w, parallel_dim=parallel_dim)
    assert torch.equal(p.scale, _deepspeed_layout(w, 4, parallel_dim))
    n = w.shape[parallel_dim] // 2
    h1 = w.narrow(parallel_dim, n, n)
    assert torch.equal(p.scale.reshape(-1)[8:], group_quantize_ref(h1, 4)[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_deepspeed_ops_bit_for_bit(dtype):
    """DeepSpeed's ops as the spec states them (min/max in the input dtype, .float(), x / scale in fp32)."""
    w = (torch.randn(16, 24) * 0.05).to(dtype)
    q_range = 256
    flat = w.reshape(16, -1)
    scale = torch.max(flat.min(1, keepdim=True)[0].float().abs(), flat.max(1, keepdim=True)[0].float().abs())
    scale = scale * 2.0 / q_range
    q = (flat / scale).round().clamp(-q_range // 2, q_range // 2 - 1).reshape(w.shape).to(torch.int8)
    p = GroupQuantizer().quantize(w)
    assert torch.equal(p.data, q)
    assert torch.equal(p.scale.reshape(-1)[:16], scale.squeeze())


def test_group_size_and_num_groups():
    w = torch.randn(8, 6)
    p = GroupQuantizer(group_size=2).quantize(w)  # G = 4: two rows per group
    assert p.scale.shape == (4, 3)
    assert torch.equal(p.data, group_quantize_ref(w, 4)[0])
    assert torch.equal(p.scale, _deepspeed_layout(w, 4))
    p = GroupQuantizer(num_groups=3, group_size=5).quantize(w)  # num_groups wins; group_size is unused
    assert p.scale.shape == (3, 3)
    assert torch.equal(p.data, group_quantize_ref(w, 3)[0])
    assert torch.equal(p.scale, _deepspeed_layout(w, 3))
    p = GroupQuantizer(num_groups=1).quantize(w)
    assert p.scale.shape == (1, 3)
    assert torch.equal(p.scale, _deepspeed_layout(w, 1))


def test_num_bits_4():
    w = torch.randn(4, 8)
    p = GroupQuantizer(num_bits=4).quantize(w)
    assert int(p.min()) >= -8 and int(p.max()) <= 7
    assert torch.equal(p.scale, _deepspeed_layout(w, 4, num_bits=4))


@pytest.mark.parametrize("kwargs", [{"qkv": False}, {}], ids=["qkv=False", "q_int8=False"])
def test_pass_through(kwargs):
    w = torch.randn(4, 6)
    quantizer = GroupQuantizer(q_int8=False) if not kwargs else GroupQuantizer()
    p = quantizer.quantize(w, **kwargs)
    assert isinstance(p, nn.Parameter) and not p.requires_grad
    assert p.dtype == torch.float32 and p.data_ptr() == w.data_ptr()
    assert p.scale.shape == (1,)
    assert torch.equal(group_dequantize(p), w)


def test_trainable_parameter_input_is_quantized_without_grad():
    w = nn.Parameter(torch.randn(4, 6))
    p = GroupQuantizer().quantize(w)
    assert not p.requires_grad and p.grad_fn is None
    assert w.requires_grad  # the source weight is left alone


def test_stays_on_the_input_device(device):
    w = torch.randn(4, 6, device=device)
    p = GroupQuantizer().quantize(w)
    assert p.device == w.device and p.scale.device == w.device


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dequantize_round_trip(dtype):
    w = (torch.randn(8, 32) * 0.1).to(dtype)
    p = GroupQuantizer().quantize(w)
    s = p.scale.reshape(-1)[:8, None]
    for out_dtype in (None, torch.float32, dtype):
        d = group_dequantize(p, dtype=out_dtype)
        assert d.dtype == (out_dtype or torch.float32) and d.shape == w.shape
    d = group_dequantize(p)
    assert torch.equal(d, p.data.float() * s)
    err = (d.double() - w.double()).abs()
    assert (err <= s.double() * (1 + 1e-5)).all()  # at most one step (half a step below the top code)
    # an explicit (G,) scale, as from the reference
    q, scale = group_quantize_ref(w, 8)
    assert torch.equal(group_dequantize(q, scale), d)


def test_dequantize_all_zero_group_is_zero():
    w = torch.randn(4, 6)
    w[2] = 0.0
    p = GroupQuantizer().quantize(w)
    d = group_dequantize(p)
    assert torch.isfinite(d).all() and (d[2] == 0).all()
    assert (p.data[2] == 0).all() and p.scale.reshape(-1)[2] == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantized_linear_matches_linear_with_dequantized_weight(dtype):
    w = (torch.randn(12, 16) * 0.1).to(dtype)
    bias = torch.randn(12).to(dtype)
    x = torch.randn(2, 5, 16).to(dtype)
    p = GroupQuantizer().quantize(w)
    wd = group_dequantize(p, dtype=dtype)
    assert torch.equal(quantized_linear(x, p, bias), F.linear(x, wd, bias))
    assert torch.equal(quantized_linear(x, p), F.linear(x, wd))
    y = quantized_linear(x, p, bias)
    assert y.dtype == dtype and y.shape == (2, 5, 12)
    # close to the unquantized layer
    ref = F.linear(x.double(), w.double(), bias.double())
    assert (y.double() - ref).abs().max() < 0.05


def test_quantized_linear_with_pass_through_weight():
    w = torch.randn(6, 4)
    x = torch.randn(3, 4)
    p = GroupQuantizer(q_int8=False).quantize(w)
    assert torch.equal(quantized_linear(x, p), F.linear(x, w))


def test_quantizer_errors():
    w = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"row count 6.*group_size \(4\)"):
        GroupQuantizer(group_size=4).quantize(w)
    with pytest.raises(ValueError, match=r"24 elements.*num_groups=5"):
        GroupQuantizer(num_groups=5).quantize(w)
    with pytest.raises(ValueError, match=r"odd size 3 along parallel_dim=0"):
        GroupQuantizer().quantize(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"12 elements.*num_groups=8"):
        GroupQuantizer(num_groups=8).quantize(torch.randn(4, 6))  # 24 = 8 x 3, but a half has 12
    with pytest.raises(ValueError, match=r"parallel_dim=2 is out of range"):
        GroupQuantizer().quantize(w, parallel_dim=2)
    with pytest.raises(ValueError, match="at least 1 dim"):
        GroupQuantizer().quantize(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"num_groups=0"):
        GroupQuantizer().quantize(torch.randn(0, 4))
    with pytest.raises(TypeError, match="inputs must have dtype in"):
        GroupQuantizer().quantize(torch.ones(4, 4, dtype=torch.int32))
    for bits in (1, 9):
        with pytest.raises(ValueError, match=rf"num_bits must be in 2..8.*got {bits}"):
            GroupQuantizer(num_bits=bits)
    with pytest.raises(ValueError, match="group_size must be >= 1, got 0"):
        GroupQuantizer(group_size=0)
    with pytest.raises(ValueError, match="num_groups must be >= 0, got -1"):
        GroupQuantizer(num_groups=-1)
    with pytest.raises(TypeError, match="num_bits must be an int, got float"):
        GroupQuantizer(num_bits=8.0)


def test_dequantize_and_linear_errors():
    q = torch.zeros(4, 6, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"no \.scale attribute"):
        group_dequantize(q)
    with pytest.raises(ValueError, match=r"scale must have shape \(G,\) or DeepSpeed's \(G, 3\).*\(4, 2\)"):
        group_dequantize(q, torch.ones(4, 2))
    with pytest.raises(ValueError, match=r"24 elements.*5 groups"):
        group_dequantize(q, torch.ones(5))
    with pytest.raises(TypeError, match="int8 codes.*int32"):
        group_dequantize(q.int(), torch.ones(4))
    with pytest.raises(TypeError, match="dtype must be one of"):
        group_dequantize(q, torch.ones(4), dtype=torch.int32)
    p = GroupQuantizer().quantize(torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"in-features 6 of q_weight \(4, 6\)"):
        quantized_linear(torch.randn(2, 5), p)
    with pytest.raises(ValueError, match="q_weight must have 2 dims"):
        quantized_linear(torch.randn(2, 6), torch.zeros(24, dtype=torch.int8))
    with pytest.raises(TypeError, match="x must have dtype in"):
        quantized_linear(torch.ones(2, 6, dtype=torch.int64), p)
