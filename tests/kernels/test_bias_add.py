"""Each nhwc_bias_add backend (torch; triton under the interpreter) against the float64 reference.

Variants: bias; bias + other; bias + other + other_bias. Layouts: 4-D NCHW channels_last and 3-D (B, S, C).
"""

import pytest
import torch

from fastlayers.functional.bias_add import nhwc_bias_add
from fastlayers.reference.bias_add import nhwc_bias_add_ref
from tests.tolerances import assert_close

CL = torch.channels_last
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
DTYPES = [torch.float32, torch.float16]
VARIANTS = ["bias", "other", "other_bias"]
# (N, H, W) for 4-D or (B, S) for 3-D, and C: C = 7 (one masked 16-wide column block, 128-row tiles over 198
# rows), 40, 96 (two 64-wide column blocks, the second half masked)
SMALL = [("4d", (2, 9, 11), 7), ("4d", (1, 3, 5), 40), ("3d", (2, 13), 7), ("3d", (3, 5), 96)]


def _act(layout, lead, c, dtype):
    if layout == "4d":
        n, h, w = lead
        return torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=CL)
    return torch.randn(*lead, c).to(dtype)


def _inputs(layout, lead, c, dtype, variant):
    act = _act(layout, lead, c, dtype)
    bias = torch.randn(c).to(dtype)
    other = _act(layout, lead, c, dtype) if variant != "bias" else None
    other_bias = torch.randn(c).to(dtype) if variant == "other_bias" else None
    return act, bias, other, other_bias


def _ref64(act, bias, other, other_bias):
    return nhwc_bias_add_ref(*(None if t is None else t.double() for t in (act, bias, other, other_bias)))


def _check(out, act, bias, other, other_bias):
    assert out.shape == act.shape and out.dtype == act.dtype
    if act.dim() == 4:
        assert out.is_contiguous(memory_format=CL)
    assert_close(out, _ref64(act, bias, other, other_bias), act.dtype, name="out")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", SMALL, ids=[f"{lay}-{'x'.join(map(str, lead))}-C{c}" for lay, lead, c in SMALL])
def test_matches_reference(backend, dtype, variant, case):
    act, bias, other, other_bias = _inputs(*case, dtype, variant)
    before = [t.clone() for t in (act, other) if t is not None]
    out = nhwc_bias_add(act, bias, other, other_bias, backend=backend)
    _check(out, act, bias, other, other_bias)
    for t, t0 in zip([t for t in (act, other) if t is not None], before, strict=True):
        assert torch.equal(t, t0)  # not in place


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_fp16_is_computed_in_fp32_and_rounded_once(backend, variant):
    """These fp16 sums are exact in fp32, so one rounding gives the fp64 sum rounded to fp16, bit for bit
    (the fp16 reference, which rounds after every add, does not always)."""
    act, bias, other, other_bias = _inputs("4d", (2, 6, 5), 24, torch.float16, variant)
    out = nhwc_bias_add(act, bias, other, other_bias, backend=backend)
    assert torch.equal(out, _ref64(act, bias, other, other_bias).half())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("c", [320, 1280, 1601])
@pytest.mark.parametrize("layout", ["4d", "3d"])
def test_torch_backend_stable_diffusion_widths(variant, c, layout):
    lead = (2, 8, 8) if layout == "4d" else (2, 64)
    for dtype in (torch.float32, torch.float16):
        act, bias, other, other_bias = _inputs(layout, lead, c, dtype, variant)
        _check(nhwc_bias_add(act, bias, other, other_bias, backend="torch"), act, bias, other, other_bias)


@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_backend_deepspeed_tolerance_fp16(variant):
    """DeepSpeed's test: batch 2, 16x16 image, C = 640, fp16 vs its reference at rtol 3e-2, atol 2e-3."""
    act, bias, other, other_bias = _inputs("4d", (2, 16, 16), 640, torch.float16, variant)
    b = bias.reshape(1, -1, 1, 1)
    want = act + b if other is None else (act + b) + (other if other_bias is None else other + other_bias.view(b.shape))
    out = nhwc_bias_add(act, bias, other, other_bias, backend="torch")
    assert torch.allclose(out, want, rtol=3e-2, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_backend_bf16_fp64(dtype, variant):
    act, bias, other, other_bias = _inputs("4d", (2, 4, 4), 320, dtype, variant)
    _check(nhwc_bias_add(act, bias, other, other_bias, backend="torch"), act, bias, other, other_bias)


@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_backend_keeps_nchw_contiguous_layout(variant):
    """A 4-D activation that is not channels_last: torch computes it per channel and keeps its layout."""
    act = torch.randn(2, 5, 3, 4)
    bias = torch.randn(5)
    other = torch.randn(2, 5, 3, 4).contiguous(memory_format=CL) if variant != "bias" else None  # mixed layouts
    other_bias = torch.randn(5) if variant == "other_bias" else None
    out = nhwc_bias_add(act, bias, other, other_bias, backend="torch")
    assert out.is_contiguous()
    assert_close(out, _ref64(act, bias, other, other_bias), torch.float32, name="out")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """A 3-D activation with a transposed (non-unit channel stride) layout, a stride-2 bias, a sliced other."""
    act = torch.randn(2, 12, 5).transpose(1, 2)  # (2, 5, 12), channel stride 5
    bias = torch.randn(24)[::2]
    other = torch.randn(2, 5, 30)[:, :, :12]
    other_bias = torch.randn(12)
    out = nhwc_bias_add(act, bias, other, other_bias, backend=backend)
    assert_close(out, _ref64(act, bias, other, other_bias), torch.float32, name="out")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    act = torch.randn(0, 6, 4, 4).contiguous(memory_format=CL)
    out = nhwc_bias_add(act, torch.randn(6), torch.randn(0, 6, 4, 4), backend=backend)
    assert out.shape == act.shape
    out = nhwc_bias_add(torch.randn(2, 0, 6), torch.randn(6), backend=backend)
    assert out.shape == (2, 0, 6)
    act = torch.randn(2, 0, 3, 4).contiguous(memory_format=CL)  # C = 0
    out = nhwc_bias_add(act, torch.randn(0), torch.randn(2, 0, 3, 4), torch.randn(0), backend=backend)
    assert out.shape == act.shape


@pytest.mark.interpreter
def test_triton_launcher_other_layouts():
    """The launcher copies what is not laid out as rows of C: an NCHW-contiguous other, or activation (the
    output is then channels_last)."""
    from fastlayers.kernels.triton.bias_add import nhwc_bias_add_fwd

    act = torch.randn(2, 7, 3, 5).contiguous(memory_format=CL)
    bias, other_bias = torch.randn(7), torch.randn(7)
    other = torch.randn(2, 7, 3, 5)  # NCHW contiguous
    out = nhwc_bias_add_fwd(act, bias, other, other_bias)
    assert out.is_contiguous(memory_format=CL)
    assert_close(out, _ref64(act, bias, other, other_bias), torch.float32, name="out")
    out = nhwc_bias_add_fwd(act.contiguous(), bias, other)
    assert out.is_contiguous(memory_format=CL)
    assert_close(out, _ref64(act, bias, other, None), torch.float32, name="out")
    with pytest.raises(ValueError, match="other_bias was given without other"):
        nhwc_bias_add_fwd(act, bias, None, other_bias)


def test_torch_launcher_other_bias_without_other():
    from fastlayers.kernels.torch.bias_add import nhwc_bias_add_fwd

    with pytest.raises(ValueError, match="other_bias was given without other"):
        nhwc_bias_add_fwd(torch.randn(1, 2, 3), torch.randn(3), None, torch.randn(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_torch_backend_autograd(dtype):
    """Inputs that require grad go through differentiable plain ops: grads of act/other are dy, of the biases
    the channel sums of dy."""
    act, bias, other, other_bias = (t.requires_grad_() for t in _inputs("4d", (2, 3, 4), 6, dtype, "other_bias"))
    out = nhwc_bias_add(act, bias, other, other_bias, backend="torch")
    assert out.requires_grad and out.is_contiguous(memory_format=CL)
    _check(out.detach(), act.detach(), bias.detach(), other.detach(), other_bias.detach())
    dy = torch.randn_like(out)
    da, db, do, dob = torch.autograd.grad(out, (act, bias, other, other_bias), dy)
    assert torch.equal(da, dy) and torch.equal(do, dy)
    want_db = dy.double().sum((0, 2, 3))
    assert_close(db, want_db, dtype, "bwd", name="dbias")
    assert_close(dob, want_db, dtype, "bwd", name="dother_bias")
