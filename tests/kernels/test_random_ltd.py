"""Each token gather / scatter backend (torch; triton under the interpreter) against the reference.

Gather and scatter move values without arithmetic: they must equal the reference exactly. The gather gradient
adds (index_add) and is compared with the backward tolerance; with distinct indices it is exact too.
"""

import pytest
import torch

from fastlayers.functional.random_ltd import token_gather, token_scatter_
from fastlayers.reference.tokens import token_gather_grad_ref, token_gather_ref, token_scatter_ref_
from tests.tolerances import assert_close

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
DTYPES = [torch.float32, torch.float16]
LAYOUTS = [True, False]
IDX_DTYPES = [torch.int32, torch.int64]
# (B, S, R, C): R = 1, R = S, odd C (7, 1000), C = 1 and a power of two
SHAPES = [(2, 9, 4, 7), (3, 8, 1, 16), (2, 6, 6, 7), (2, 5, 3, 1000), (2, 4, 2, 1)]


def _indices(b, s, r, dtype=torch.int64):
    return torch.stack([torch.randperm(s)[:r].sort().values for _ in range(b)]).to(dtype)


def _act(b, s, c, batch_first, dtype):
    return torch.randn((b, s, c) if batch_first else (s, b, c), dtype=dtype)


def _check(backend, x, idx, batch_first, dtype):
    """Forward of gather and scatter exactly, gather backward against the reference's autograd."""
    s = x.shape[1 if batch_first else 0]
    xl = x.detach().requires_grad_()
    out = token_gather(xl, idx, batch_first, backend=backend)
    assert out.dtype == dtype
    assert torch.equal(out, token_gather_ref(x, idx, batch_first))
    g = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, xl, g)
    assert dx.dtype == dtype and dx.shape == x.shape
    assert_close(dx, token_gather_grad_ref(g.double(), idx, s, batch_first), dtype, "bwd", name="dact")
    got = x.clone()
    assert token_scatter_(got, g, idx, batch_first, backend=backend) is got
    assert torch.equal(got, token_scatter_ref_(x.clone(), g, idx, batch_first))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch_first", LAYOUTS, ids=["bsc", "sbc"])
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=["i32", "i64"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}S{s}R{r}C{c}" for b, s, r, c in SHAPES])
def test_gather_scatter_match_reference(backend, dtype, batch_first, idx_dtype, shape):
    b, s, r, c = shape
    _check(backend, _act(b, s, c, batch_first, dtype), _indices(b, s, r, idx_dtype), batch_first, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
@pytest.mark.parametrize("batch_first", LAYOUTS, ids=["bsc", "sbc"])
def test_torch_backend_bf16_and_fp64(dtype, batch_first):
    _check("torch", _act(3, 17, 1000, batch_first, dtype), _indices(3, 17, 9, torch.int32), batch_first, dtype)


def _non_contiguous(kind, b, s, c, batch_first):
    """Activations of logical shape (B, S, C) / (S, B, C) whose memory is not that layout."""
    shape = (b, s, c) if batch_first else (s, b, c)
    if kind == "transposed":  # stored in the other layout (e.g. a seq-first tensor viewed batch-first)
        return torch.randn(shape[1], shape[0], c).transpose(0, 1)
    if kind == "padded_c":  # a slice of wider rows: unit C stride, row stride > C
        return torch.randn(*shape[:2], c + 5)[..., :c]
    if kind == "strided_c":  # every other channel: C stride 2 (copied before the Triton kernels)
        return torch.randn(*shape[:2], 2 * c)[..., ::2]
    if kind == "strided_seq":  # every other token
        return torch.randn(2 * shape[0], shape[1], c)[::2] if not batch_first else torch.randn(b, 2 * s, c)[:, ::2]
    raise AssertionError(kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["transposed", "padded_c", "strided_c", "strided_seq"])
@pytest.mark.parametrize("batch_first", LAYOUTS, ids=["bsc", "sbc"])
def test_non_contiguous_activations(backend, kind, batch_first):
    b, s, r, c = 3, 8, 3, 7
    x = _non_contiguous(kind, b, s, c, batch_first)
    assert not x.is_contiguous()
    idx = _indices(b, s, r)
    _check(backend, x, idx, batch_first, torch.float32)
    # scatter into a non-contiguous destination writes through to its storage
    base = x.clone() if kind != "transposed" else x.transpose(0, 1).clone().transpose(0, 1)
    part = torch.randn((b, r, c) if batch_first else (r, b, c)).transpose(0, 1).contiguous().transpose(0, 1)
    want = token_scatter_ref_(base.clone(), part, idx, batch_first)
    token_scatter_(base, part, idx, batch_first, backend=backend)
    assert torch.equal(base, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", LAYOUTS, ids=["bsc", "sbc"])
def test_gather_backward_adds_repeated_positions(backend, batch_first):
    """index_add semantics: a position kept twice in one row receives the sum of both gradients."""
    idx = torch.tensor([[2, 2, 5, 2], [0, 1, 1, 6]], dtype=torch.int32)
    x = _act(2, 7, 9, batch_first, torch.float32).requires_grad_()
    out = token_gather(x, idx, batch_first, backend=backend)
    assert torch.equal(out, token_gather_ref(x.detach(), idx, batch_first))
    g = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, g)
    assert_close(dx, token_gather_grad_ref(g.double(), idx, 7, batch_first), torch.float32, "bwd", name="dact")


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_upstream_gradient(backend):
    """`.sum().backward()` hands the gather backward a stride-0 gradient."""
    x = torch.randn(2, 6, 5, requires_grad=True)
    idx = _indices(2, 6, 3)
    token_gather(x, idx, backend=backend).sum().backward()
    want = torch.zeros(2, 6, 5)
    for i in range(2):
        want[i, idx[i]] = 1.0
    assert torch.equal(x.grad, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", LAYOUTS, ids=["bsc", "sbc"])
def test_zero_kept_tokens(backend, batch_first):
    x = _act(2, 5, 3, batch_first, torch.float32).requires_grad_()
    idx = torch.zeros(2, 0, dtype=torch.int64)
    out = token_gather(x, idx, batch_first, backend=backend)
    assert out.shape == ((2, 0, 3) if batch_first else (0, 2, 3))
    (dx,) = torch.autograd.grad(out, x, torch.zeros_like(out))
    assert torch.equal(dx, torch.zeros_like(x))


@pytest.mark.interpreter
def test_triton_launchers_skip_out_of_range_indices():
    """The kernels never touch memory for an index outside [0, S) (the functional layer rejects them on CPU;
    on CUDA it does not check, to avoid a device sync)."""
    from fastlayers.kernels.triton.tokens import token_gather as gather
    from fastlayers.kernels.triton.tokens import token_gather_bwd, token_scatter_

    x = torch.randn(2, 4, 3)
    idx = torch.tensor([[0, 4], [-1, 3]])
    out = gather(x, idx)
    assert torch.equal(out[0, 0], x[0, 0]) and torch.equal(out[1, 1], x[1, 3])
    assert torch.equal(out[0, 1], torch.zeros(3)) and torch.equal(out[1, 0], torch.zeros(3))
    y = x.clone()
    token_scatter_(y, torch.ones(2, 2, 3), idx)
    want = x.clone()
    want[0, 0] = 1.0
    want[1, 3] = 1.0
    assert torch.equal(y, want)
    dx = token_gather_bwd(torch.ones(2, 2, 3), idx, 4)
    dx_want = torch.zeros(2, 4, 3)
    dx_want[0, 0] = dx_want[1, 3] = 1.0
    assert torch.equal(dx, dx_want)


@pytest.mark.parametrize("kind", ["transposed", "padded_c", "strided_c", "strided_seq"])
@pytest.mark.parametrize("batch_first", LAYOUTS, ids=["bsc", "sbc"])
def test_torch_backend_reads_strided_layouts_without_a_copy(kind, batch_first):
    """These layouts are one (N, C) row view of the same storage: index_select / index_copy_ work on it directly."""
    from fastlayers.kernels.torch.tokens import _row_table

    x = _non_contiguous(kind, 3, 8, 7, batch_first)
    rows, _, _ = _row_table(x, batch_first)
    assert rows.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    expanded = torch.randn(1, 8, 7).expand(3, 8, 7)  # rows alias: falls back to advanced indexing
    assert _row_table(expanded, True) is None
