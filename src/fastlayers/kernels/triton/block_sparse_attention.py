"""Block-sparse flash attention in Triton: only the kept blocks of a (H, nb, nb) layout are visited.

The layout becomes a CSR-like index once per layout (`layout_index`): per (head, query block) the number of kept
key blocks and their ids (`kv_num`, `kv_idx`), and the transpose (`q_num`, `q_idx`) for the dk/dv pass. The
forward runs one program per (query tile, batch·head) over the kept key blocks of its row with an online
softmax in base 2 and saves the log-sum-exp; the backward recomputes the probabilities: dq per query tile
(row-wise) and dk/dv per key tile (column-wise, from the transposed index). rpe, key padding and attention
masks enter as additive fp32 biases (`HAS_*` constexprs). Rows with no allowed key give zeros (lse = +inf).

Based on the structure of the Triton fused-attention tutorial (06, https://github.com/triton-lang/triton,
python/tutorials/06-fused-attention.py) and FlexAttention's block-sparse iteration (kv_num_blocks/kv_indices).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastlayers.kernels.triton._common import AOT_DTYPES
from fastlayers.kernels.triton.aot import AotSpec
from fastlayers.utils import LayoutCache, next_pow2

LOG2E = 1.4426950408889634


# fmt: off
@triton.jit
def _kept_tile_scores(
    q, t, idx_base, k_base, v_base, Rpe, Kpm, Am, b, h, m0, rm, rn, rd, d_ok,
    stride_ks, stride_kd, stride_vs, stride_vd, stride_it,
    stride_rb, stride_rh, stride_rm, stride_rn, stride_kpb, stride_kpn, stride_amm, stride_amn,
    qk_scale,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_RPE: tl.constexpr, HAS_KPM: tl.constexpr, HAS_AM: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Step t of a row's loop over (kept block, sub-tile): the key/value tile and the scores in base 2,
    s = (q.k * scale + biases) * log2(e), with its key offset n0 (shared by the forward and the dq pass)."""
    kblk = tl.load(idx_base + (t // (BLOCK // BLOCK_N)) * stride_it).to(tl.int64)
    n0 = kblk * BLOCK + (t % (BLOCK // BLOCK_N)) * BLOCK_N
    k = tl.load(k_base + n0 * stride_ks + rn[:, None] * stride_ks + rd[None, :] * stride_kd,
                mask=d_ok[None, :], other=0.0)
    v = tl.load(v_base + n0 * stride_vs + rn[:, None] * stride_vs + rd[None, :] * stride_vd,
                mask=d_ok[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if HAS_RPE:
        r_base = Rpe + b * stride_rb + h * stride_rh + m0 * stride_rm + n0 * stride_rn
        s += tl.load(r_base + rm[:, None] * stride_rm + rn[None, :] * stride_rn).to(tl.float32) * 1.4426950408889634
    if HAS_KPM:
        s += tl.load(Kpm + b * stride_kpb + n0 * stride_kpn + rn * stride_kpn)[None, :] * 1.4426950408889634
    if HAS_AM:
        a_base = Am + m0 * stride_amm + n0 * stride_amn
        s += tl.load(a_base + rm[:, None] * stride_amm + rn[None, :] * stride_amn) * 1.4426950408889634
    return k, v, s, n0


@triton.jit
def _block_sparse_attn_fwd_kernel(
    Q, K, V, Out, Lse,  # (B, H, S, D) x4 and (B, H, S) fp32
    Rpe, Kpm, Am,  # additive biases: (B|1, H, S, S) q dtype; (B, S) fp32; (S, S) fp32
    KvNum, KvIdx,  # (H, nb) int32 kept blocks per row; (H, nb, max_kept) int32 their column ids
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_rb, stride_rh, stride_rm, stride_rn,
    stride_kpb, stride_kpn,
    stride_amm, stride_amn,
    stride_nh, stride_nn,
    stride_ih, stride_in, stride_it,
    H, S, HEAD_DIM,
    qk_scale,  # softmax_scale * log2(e)
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_RPE: tl.constexpr, HAS_KPM: tl.constexpr, HAS_AM: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # int64 scalars for the tile origins (b, h, m0, n0); int32 offsets inside a tile keep register use low
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    m0 = pid_m * BLOCK_M
    qblk = m0 // BLOCK  # block row of this query tile
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < HEAD_DIM
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    # -- the query tile is loaded once; all math is fp32 (dots take the input dtype, accumulate in fp32) --
    q = tl.load(Q + b * stride_qb + h * stride_qh + m0 * stride_qs + rm[:, None] * stride_qs + rd[None, :] * stride_qd,
                mask=d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_kv = tl.load(KvNum + h * stride_nh + qblk * stride_nn)
    idx_base = KvIdx + h * stride_ih + qblk * stride_in
    # one flat loop over (kept block, sub-tile): unrolling the sub-tiles would double the live registers
    for t in range(0, n_kv * (BLOCK // BLOCK_N)):
        k, v, s, n0 = _kept_tile_scores(
            q, t, idx_base, k_base, v_base, Rpe, Kpm, Am, b, h, m0, rm, rn, rd, d_ok,
            stride_ks, stride_kd, stride_vs, stride_vd, stride_it,
            stride_rb, stride_rh, stride_rm, stride_rn, stride_kpb, stride_kpn, stride_amm, stride_amn,
            qk_scale, BLOCK, BLOCK_N, HAS_RPE, HAS_KPM, HAS_AM, DOT_PREC)
        # -- online softmax; a row that is still all -inf keeps m = -inf and uses 0 as its shift --
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    # -- rows with no allowed key: out = 0 and lse = +inf (so the backward's exp2(s - lse) is 0) --
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), tl.where(empty, 0.0, m_i) + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(Out + b * stride_ob + h * stride_oh + m0 * stride_os + rm[:, None] * stride_os + rd[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=d_ok[None, :])
    tl.store(Lse + pid_bh * S + m0 + rm, lse)


@triton.jit
def _block_sparse_attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, Lse, Delta,  # (B, H, S, D) x5; lse, delta (B, H, S) fp32
    Rpe, Kpm, Am, DRpe,  # biases as in the forward; DRpe (B, H, S, S) fp32 (only kept blocks are written)
    KvNum, KvIdx,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    stride_rb, stride_rh, stride_rm, stride_rn,
    stride_kpb, stride_kpn,
    stride_amm, stride_amn,
    stride_drb, stride_drh, stride_drm, stride_drn,
    stride_nh, stride_nn,
    stride_ih, stride_in, stride_it,
    H, S, HEAD_DIM,
    qk_scale, sm_scale,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_RPE: tl.constexpr, HAS_KPM: tl.constexpr, HAS_AM: tl.constexpr, HAS_DRPE: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    m0 = pid_m * BLOCK_M
    qblk = m0 // BLOCK
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < HEAD_DIM
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    q = tl.load(Q + b * stride_qb + h * stride_qh + m0 * stride_qs + rm[:, None] * stride_qs + rd[None, :] * stride_qd,
                mask=d_ok[None, :], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + m0 * stride_dos + rm[:, None] * stride_dos
                 + rd[None, :] * stride_dod, mask=d_ok[None, :], other=0.0)
    lse = tl.load(Lse + pid_bh * S + m0 + rm)
    delta = tl.load(Delta + pid_bh * S + m0 + rm)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_kv = tl.load(KvNum + h * stride_nh + qblk * stride_nn)
    idx_base = KvIdx + h * stride_ih + qblk * stride_in
    for t in range(0, n_kv * (BLOCK // BLOCK_N)):
        # -- recompute p = exp2(s - lse) (base 2, as in the forward) --
        k, v, s, n0 = _kept_tile_scores(
            q, t, idx_base, k_base, v_base, Rpe, Kpm, Am, b, h, m0, rm, rn, rd, d_ok,
            stride_ks, stride_kd, stride_vs, stride_vd, stride_it,
            stride_rb, stride_rh, stride_rm, stride_rn, stride_kpb, stride_kpn, stride_amm, stride_amn,
            qk_scale, BLOCK, BLOCK_N, HAS_RPE, HAS_KPM, HAS_AM, DOT_PREC)
        p = tl.math.exp2(s - lse[:, None])
        # -- ds = p * (dO.vᵀ - delta) is the gradient of the (unscaled) biased score --
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        if HAS_DRPE:
            dr_base = DRpe + b * stride_drb + h * stride_drh + m0 * stride_drm + n0 * stride_drn
            tl.store(dr_base + rm[:, None] * stride_drm + rn[None, :] * stride_drn, ds)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + m0 * stride_dqs + rm[:, None] * stride_dqs
             + rd[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=d_ok[None, :])


@triton.jit
def _block_sparse_attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, Lse, Delta,  # (B, H, S, D) x6; lse, delta (B, H, S) fp32
    Rpe, Kpm, Am,
    QNum, QIdx,  # (H, nb) query blocks that keep each key block; (H, nb, max_rows) their row ids
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    stride_rb, stride_rh, stride_rm, stride_rn,
    stride_kpb, stride_kpn,
    stride_amm, stride_amn,
    stride_nh, stride_nn,
    stride_ih, stride_in, stride_it,
    H, S, HEAD_DIM,
    qk_scale, sm_scale,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_RPE: tl.constexpr, HAS_KPM: tl.constexpr, HAS_AM: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    n0 = pid_n * BLOCK_N
    kblk = n0 // BLOCK  # block column of this key tile
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < HEAD_DIM
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    k = tl.load(K + b * stride_kb + h * stride_kh + n0 * stride_ks + rn[:, None] * stride_ks + rd[None, :] * stride_kd,
                mask=d_ok[None, :], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + n0 * stride_vs + rn[:, None] * stride_vs + rd[None, :] * stride_vd,
                mask=d_ok[None, :], other=0.0)
    if HAS_KPM:
        kpm = tl.load(Kpm + b * stride_kpb + n0 * stride_kpn + rn * stride_kpn) * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    n_q = tl.load(QNum + h * stride_nh + kblk * stride_nn)
    idx_base = QIdx + h * stride_ih + kblk * stride_in
    for t in range(0, n_q * (BLOCK // BLOCK_M)):
        qblk = tl.load(idx_base + (t // (BLOCK // BLOCK_M)) * stride_it).to(tl.int64)
        m0 = qblk * BLOCK + (t % (BLOCK // BLOCK_M)) * BLOCK_M
        q = tl.load(q_base + m0 * stride_qs + rm[:, None] * stride_qs + rd[None, :] * stride_qd,
                    mask=d_ok[None, :], other=0.0)
        do = tl.load(do_base + m0 * stride_dos + rm[:, None] * stride_dos + rd[None, :] * stride_dod,
                     mask=d_ok[None, :], other=0.0)
        lse = tl.load(Lse + pid_bh * S + m0 + rm)
        delta = tl.load(Delta + pid_bh * S + m0 + rm)
        # -- transposed scores sT[n, m] (keys along rows), base 2 --
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        if HAS_RPE:
            r_base = Rpe + b * stride_rb + h * stride_rh + m0 * stride_rm + n0 * stride_rn
            rT = tl.load(r_base + rm[None, :] * stride_rm + rn[:, None] * stride_rn)
            sT += rT.to(tl.float32) * 1.4426950408889634
        if HAS_KPM:
            sT += kpm[:, None]
        if HAS_AM:
            a_base = Am + m0 * stride_amm + n0 * stride_amn
            sT += tl.load(a_base + rm[None, :] * stride_amm + rn[:, None] * stride_amn) * 1.4426950408889634
        pT = tl.math.exp2(sT - lse[None, :])
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + n0 * stride_dks + rn[:, None] * stride_dks
             + rd[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=d_ok[None, :])
    tl.store(DV + b * stride_dvb + h * stride_dvh + n0 * stride_dvs + rn[:, None] * stride_dvs
             + rd[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=d_ok[None, :])
# fmt: on


# ----------------------------------------------------------------------------------------------------------------
# Host side: layout index, launch configuration, launchers
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LayoutIndex:
    """CSR-like index of a (H, nb, nb) layout, on the kernels' device (int32)."""

    kv_num: torch.Tensor  # (H, nb) kept key blocks of each query-block row
    kv_idx: torch.Tensor  # (H, nb, max(1, max kv_num)) their column ids, increasing, padded with 0
    q_num: torch.Tensor  # (H, nb) query-block rows that keep each key-block column
    q_idx: torch.Tensor  # (H, nb, max(1, max q_num)) their row ids


def _csr(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    nb = keep.shape[-1]
    num = keep.sum(-1)
    width = max(1, int(num.max()) if num.numel() else 1)
    col = torch.arange(nb)
    order = torch.argsort((~keep).to(torch.int64) * nb + col, dim=-1, stable=True)[..., :width]
    idx = torch.where(col[:width] < num[..., None], order, torch.zeros_like(order))
    return num.to(torch.int32), idx.to(torch.int32)


def build_layout_index(layout: torch.Tensor, device: torch.device) -> LayoutIndex:
    keep = layout.detach().to("cpu") != 0  # (H, nb, nb)
    kv_num, kv_idx = _csr(keep)
    q_num, q_idx = _csr(keep.transpose(1, 2))
    return LayoutIndex(*(t.contiguous().to(device) for t in (kv_num, kv_idx, q_num, q_idx)))


_INDEX_CACHE = LayoutCache(lambda layout, device: build_layout_index(layout, device))


def layout_index(layout: torch.Tensor, device: torch.device) -> LayoutIndex:
    """`build_layout_index`, cached per layout (verified by content, so in-place edits are seen)."""
    return _INDEX_CACHE.get(layout, device)


def _tile(block: int, block_d: int, fp32: bool) -> int:
    """Query/key tile: min(block, 32) (fp32 with D > 64: 16); larger blocks are walked as sub-tiles. 64-wide tiles
    reach 255 registers and spill in the backward kernels (and with biases) on sm_80/sm_90, so none is used."""
    cap = 16 if (fp32 and block_d > 64) else 32
    return min(block, cap)


def _num_warps(tile: int, block_d: int, fp32: bool) -> int:
    # From the AOT table: 4 warps spill for fp32 32-wide tiles (full-precision dots) and for half D = 128 tiles;
    # fp32 D = 128 (16-wide tiles) spills with 8 warps but not with 4.
    return 8 if (fp32 and tile >= 32) or (not fp32 and block_d > 64) else 4


def _dot_prec(dtype: torch.dtype) -> str:
    # fp32 inputs: full-precision dots (tf32 would miss the fp32 tolerances); fp16/bf16 ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"


def _additive(mask: torch.Tensor | None, mode: str) -> torch.Tensor | None:
    """DeepSpeed mask modes as an fp32 additive bias: "mul": 0 -> -inf, nonzero -> 0; "add": the values."""
    if mask is None:
        return None
    if mode == "add":
        return mask.float()
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(mask == 0, float("-inf"))


def _bias_args(q, rpe, kpm, am):
    r_strides = (rpe.stride(0) if rpe.shape[0] > 1 else 0, *rpe.stride()[1:]) if rpe is not None else (0, 0, 0, 0)
    return (
        rpe if rpe is not None else q,
        kpm if kpm is not None else q,
        am if am is not None else q,
    ), (
        r_strides,
        kpm.stride() if kpm is not None else (0, 0),
        am.stride() if am is not None else (0, 0),
    )


def block_sparse_attention_fwd(
    q,
    k,
    v,
    index: LayoutIndex,
    block: int,
    scale: float,
    rpe=None,
    kpm=None,
    am=None,
    kpm_mode: str = "add",
    am_mode: str = "mul",
):
    """Forward launcher. q, k, v (B, H, S, D); returns out (B, H, S, D) and lse (B, H, S) fp32 (base 2)."""
    B, H, S, D = q.shape
    BLOCK_D = max(16, next_pow2(D))
    tile = _tile(block, BLOCK_D, q.dtype == torch.float32)
    out = torch.empty_like(q)
    lse = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    kpm_a, am_a = _additive(kpm, kpm_mode), _additive(am, am_mode)
    (R, KP, AM), (rs, kps, ams) = _bias_args(q, rpe, kpm_a, am_a)
    grid = (S // tile, B * H)
    _block_sparse_attn_fwd_kernel[grid](
        q,
        k,
        v,
        out,
        lse,  #
        R,
        KP,
        AM,  #
        index.kv_num,
        index.kv_idx,  #
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),  #
        *rs,
        *kps,
        *ams,  #
        *index.kv_num.stride(),
        *index.kv_idx.stride(),  #
        H,
        S,
        D,  #
        scale * LOG2E,  #
        BLOCK=block,
        BLOCK_M=tile,
        BLOCK_N=tile,
        BLOCK_D=BLOCK_D,  #
        HAS_RPE=rpe is not None,
        HAS_KPM=kpm is not None,
        HAS_AM=am is not None,
        DOT_PREC=_dot_prec(q.dtype),  #
        num_warps=_num_warps(tile, BLOCK_D, q.dtype == torch.float32),
        num_stages=2,  #
    )
    return out, lse


def block_sparse_attention_bwd(
    dout,
    q,
    k,
    v,
    out,
    lse,
    index: LayoutIndex,
    block: int,
    scale: float,
    rpe=None,
    kpm=None,
    am=None,
    kpm_mode: str = "add",
    am_mode: str = "mul",
    need_drpe: bool = False,
):
    """Backward launcher: returns dq, dk, dv (like q) and drpe (rpe's shape and dtype, or None)."""
    B, H, S, D = q.shape
    BLOCK_D = max(16, next_pow2(D))
    tile = _tile(block, BLOCK_D, q.dtype == torch.float32)
    dout = dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1)  # (B, H, S): rowsum(dO * O)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kpm_a, am_a = _additive(kpm, kpm_mode), _additive(am, am_mode)
    (R, KP, AM), (rs, kps, ams) = _bias_args(q, rpe, kpm_a, am_a)
    drpe_full = torch.zeros((B, H, S, S), dtype=torch.float32, device=q.device) if need_drpe else None
    DR = drpe_full if drpe_full is not None else lse
    drs = drpe_full.stride() if drpe_full is not None else (0, 0, 0, 0)
    flags = dict(HAS_RPE=rpe is not None, HAS_KPM=kpm is not None, HAS_AM=am is not None, DOT_PREC=_dot_prec(q.dtype))
    grid = (S // tile, B * H)
    _block_sparse_attn_bwd_dq_kernel[grid](
        q,
        k,
        v,
        dout,
        dq,
        lse,
        delta,  #
        R,
        KP,
        AM,
        DR,  #
        index.kv_num,
        index.kv_idx,  #
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *dout.stride(),
        *dq.stride(),  #
        *rs,
        *kps,
        *ams,
        *drs,  #
        *index.kv_num.stride(),
        *index.kv_idx.stride(),  #
        H,
        S,
        D,  #
        scale * LOG2E,
        scale,  #
        BLOCK=block,
        BLOCK_M=tile,
        BLOCK_N=tile,
        BLOCK_D=BLOCK_D,
        HAS_DRPE=need_drpe,
        **flags,  #
        num_warps=_num_warps(tile, BLOCK_D, q.dtype == torch.float32),
        num_stages=2,  #
    )
    _block_sparse_attn_bwd_dkdv_kernel[grid](
        q,
        k,
        v,
        dout,
        dk,
        dv,
        lse,
        delta,  #
        R,
        KP,
        AM,  #
        index.q_num,
        index.q_idx,  #
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *dout.stride(),
        *dk.stride(),
        *dv.stride(),  #
        *rs,
        *kps,
        *ams,  #
        *index.q_num.stride(),
        *index.q_idx.stride(),  #
        H,
        S,
        D,  #
        scale * LOG2E,
        scale,  #
        BLOCK=block,
        BLOCK_M=tile,
        BLOCK_N=tile,
        BLOCK_D=BLOCK_D,
        **flags,  #
        num_warps=_num_warps(tile, BLOCK_D, q.dtype == torch.float32),
        num_stages=2,  #
    )
    drpe = None
    if drpe_full is not None:
        drpe = drpe_full if rpe.shape[0] == B else drpe_full.sum(0, keepdim=True)
        drpe = drpe.to(rpe.dtype)
    return dq, dk, dv, drpe


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (default configs: no biases; plus one all-features case per kernel)
# ----------------------------------------------------------------------------------------------------------------


# pointer arguments whose element type is fixed (the others have the input dtype)
_FP32_PTRS = {"Lse", "Delta", "Kpm", "Am", "DRpe"}
_I32_PTRS = {"KvNum", "KvIdx", "QNum", "QIdx"}
_CONSTEXPRS = {"BLOCK", "BLOCK_M", "BLOCK_N", "BLOCK_D", "DOT_PREC"}


def _signature(kernel, dtype: str) -> dict[str, str]:
    """AOT signature: pointers by name (fp32/int32 or the input dtype), strides and sizes i32, scales fp32."""
    sig = {}
    for name in kernel.arg_names:
        if name in _CONSTEXPRS or name.startswith("HAS_"):
            sig[name] = "constexpr"
        elif name.startswith("stride_") or name in ("H", "S", "HEAD_DIM"):
            sig[name] = "i32"
        elif name.endswith("_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "*fp32" if name in _FP32_PTRS else "*i32" if name in _I32_PTRS else dtype
    return sig


def _aot_specs() -> list[AotSpec]:
    """Each kernel for fp32/fp16/bf16 at blocks 16/32/64/128 with D=64, and block 64 with D=128; the
    fp16 block-64 D=64 case also with every bias (rpe, key padding, attn mask, rpe gradient)."""
    kernels = (
        ("block_sparse_attn_fwd", _block_sparse_attn_fwd_kernel, {}),
        ("block_sparse_attn_bwd_dq", _block_sparse_attn_bwd_dq_kernel, {"HAS_DRPE": False}),
        ("block_sparse_attn_bwd_dkdv", _block_sparse_attn_bwd_dkdv_kernel, {}),
    )
    specs = []
    for dtype in AOT_DTYPES:
        for block, d in [(16, 64), (32, 64), (64, 64), (128, 64), (64, 128)]:
            all_features = [False, True] if (dtype, block, d) == ("*fp16", 64, 64) else [False]
            for feats in all_features:
                tile = _tile(block, d, dtype == "*fp32")
                base = dict(
                    BLOCK=block,
                    BLOCK_M=tile,
                    BLOCK_N=tile,
                    BLOCK_D=d,
                    HAS_RPE=feats,
                    HAS_KPM=feats,
                    HAS_AM=feats,
                    DOT_PREC="ieee" if dtype == "*fp32" else "tf32",
                )
                tag = f"{dtype.lstrip('*')},block={block},D={d}" + (",rpe+kpm+am" if feats else "")
                for name, kernel, extra in kernels:
                    consts = dict(base, **{k: feats for k in extra})
                    specs.append(
                        AotSpec(
                            f"{name}[{tag}]",
                            kernel,
                            _signature(kernel, dtype),
                            consts,
                            num_warps=_num_warps(tile, d, dtype == "*fp32"),
                            num_stages=2,
                        )
                    )
    return specs


AOT_SPECS = _aot_specs
