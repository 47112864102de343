"""The fused BERT-style training layer: `TransformerLayer`, a drop-in for DeepSpeed's `DeepSpeedTransformerLayer`.

Same parameter names, shapes and meaning as DeepSpeed (its checkpoints load), same op order (pre-LN and post-LN),
built from the functional ops (`layer_norm`, `bias_dropout_residual_layer_norm`, `bias_gelu_linear`, `attention`),
so every backend those ops have (torch on CPU, Triton on CUDA) serves the layer. Differences from DeepSpeed are listed
in the class docstring. The readable spec is `fastlayers.reference.transformer_layer.transformer_layer_ref`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fastlayers.configs import TransformerConfig
from fastlayers.functional.attention import attention
from fastlayers.functional.bias_gelu import bias_gelu_linear
from fastlayers.functional.layer_norm import bias_dropout_residual_layer_norm, layer_norm
from fastlayers.utils import dtype_name, keep_mask, new_seed

# Dropout sites of one forward: one seed per forward, one offset per site (DEVELOPING.md, randomness contract).
ATTN_PROBS_OFFSET, ATTN_OUT_OFFSET, FFN_OUT_OFFSET = 0, 1, 2
# How many layers were built per config.seed: layers sharing one config (DeepSpeed's usual set-up) get distinct
# reproducible dropout streams instead of identical masks in every layer.
_SEED_USES: dict[int, int] = {}
# HF / DeepSpeed forward arguments we accept only when they are empty (None / False): they would need
# cross-attention, head masks, a KV cache or attention-probability outputs, which this layer does not have.
_UNSUPPORTED_KWARGS = ("head_mask", "layer_head_mask", "encoder_hidden_states", "encoder_attention_mask",
                       "past_key_value", "past_key_values", "output_attentions", "grads")  # fmt: skip


class TransformerLayer(nn.Module):
    """One BERT-style encoder layer for training, with DeepSpeed's API (`DeepSpeedTransformerLayer`).

    Pre-LN (`config.pre_layer_norm`, DeepSpeed's default)::

        h   = x + drop(attn(LN(x; norm_w, norm_b)) @ attn_ow.T + attn_ob)
        out = h + drop(gelu(LN(h; attn_nw, attn_nb) @ inter_w.T + inter_b) @ output_w.T + output_b)

    Post-LN (BERT)::

        h   = LN(x + drop(attn(x) @ attn_ow.T + attn_ob); attn_nw, attn_nb)
        out = LN(h + drop(gelu(h @ inter_w.T + inter_b) @ output_w.T + output_b); norm_w, norm_b)

    with `attn(t) = softmax(Q Kᵀ/sqrt(d) + mask)` (attention-dropped) `@ V`, `[Q|K|V] = t @ attn_qkvw.T + attn_qkvb`.

    Memory flags (exact recomputation: outputs and gradients equal flags-off for the same seed):
    `normalize_invertible` (LayerNorms save their output, not their input), `gelu_checkpoint` (the GELU output is
    recomputed in backward), `attn_dropout_checkpoint` (the attention dropout mask is regenerated from the seed,
    neither it nor the dropped probabilities are saved).

    Randomness: each training forward with dropout draws one seed, from a layer-owned `torch.Generator`
    (`self.generator`) when `config.seed >= 0`, else from torch's global RNG (`torch.manual_seed` reproduces); the
    three dropout sites use offsets 0, 1, 2. The k-th layer built with a given `config.seed` in a process
    (`self.seed_index` = k) seeds its generator with `config.seed` for k = 0 and a distinct derived value after, so
    a stack of layers sharing one config does not repeat one mask in every layer; the same construction order
    gives the same streams. Results are bit-reproducible for a given seed on a given backend and device.
    `config.stochastic_mode` lets the layer trade that for speed where it has the choice: the FFN-output dropout
    of pre-LN mode (the one dropout not inside a fused op) then uses torch's native dropout (global RNG, ~30%
    faster on CPU) instead of the seeded mask. The fused ops have no non-deterministic variant to select.

    Differences from DeepSpeed (on purpose): any S (no padding to a multiple of 16 with random rows); the mask may
    be DeepSpeed's additive (B, 1, 1, S), HF's 4-D additive or boolean mask, or a (B, S) keep-mask of 0/1, or None;
    the config is never mutated and there is no global layer registry (only the per-seed construction count
    above); `initial_biases[0:3]` (Q, K, V biases) are used (DeepSpeed ignores them and zeroes `attn_qkvb`);
    `initial_weights`/`initial_biases` are copied, not aliased; `adjust_init_range` does not depend on the rank;
    GELU is exact (erf) unless `gelu_approximate="tanh"`; CPU, fp32, bf16 and autocast work; eval mode with grad
    enabled still supports backward; HF arguments that would change the result (head masks, cross-attention, KV
    cache, `output_attentions=True`, DeepSpeed's `grads` test hook) raise instead of being ignored.

    Args:
        config: a `TransformerConfig` (or a dict of its fields, or DeepSpeed's config object).
        initial_weights: optional 8 tensors in DeepSpeed's order: Q, K, V ([H, H] each), O [H, H], attn_nw [H],
            inter_w [I, H], output_w [H, I], norm_w [H].
        initial_biases: optional 8 tensors: Q, K, V biases [H] each, attn_ob, attn_nb, inter_b [I], output_b,
            norm_b.
        device, dtype: where and in which dtype to create the parameters (dtype default: `config.torch_dtype`).
        backend: `backend=` passed to every functional op (None: per-op automatic choice, see `fastlayers.explain`).
    """

    def __init__(
        self,
        config: TransformerConfig,
        initial_weights: Sequence[torch.Tensor] | None = None,
        initial_biases: Sequence[torch.Tensor] | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        config = _as_config(config)
        config.check_complete()
        self.config = config
        self.backend = backend
        H, I = config.hidden_size, config.intermediate_size
        factory = {"device": device, "dtype": dtype or config.torch_dtype}

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, **factory))

        self.attn_qkvw, self.attn_qkvb = param(3 * H, H), param(3 * H)
        self.attn_ow, self.attn_ob = param(H, H), param(H)
        self.attn_nw, self.attn_nb = param(H), param(H)
        self.inter_w, self.inter_b = param(I, H), param(I)
        self.output_w, self.output_b = param(H, I), param(H)
        self.norm_w, self.norm_b = param(H), param(H)
        self.reset_parameters()
        if initial_weights is not None or initial_biases is not None:
            self.load_initial(initial_weights, initial_biases)
        self.generator: torch.Generator | None = None
        self.seed_index = 0  # this layer's index among the layers built with config.seed (>= 0) in this process
        if config.seed >= 0:
            self.seed_index = _SEED_USES.get(config.seed, 0)
            _SEED_USES[config.seed] = self.seed_index + 1
            stream = (config.seed + self.seed_index * 0x9E3779B97F4A7C15) % 2**63  # layer 0: config.seed itself
            self.generator = torch.Generator().manual_seed(stream)
        self.train(config.training)

    # -- parameters ------------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """DeepSpeed's init: N(0, initializer_range) weights, output projections N(0, range/sqrt(2L)) when
        `adjust_init_range` (on every rank), zero biases, LayerNorm weights 1."""
        c = self.config
        std = c.initializer_range
        out_std = std / math.sqrt(2.0 * c.num_hidden_layers) if c.adjust_init_range else std
        with torch.no_grad():
            self.attn_qkvw.normal_(0.0, std)
            self.inter_w.normal_(0.0, std)
            self.attn_ow.normal_(0.0, out_std)
            self.output_w.normal_(0.0, out_std)
            for p in (self.attn_qkvb, self.attn_ob, self.attn_nb, self.inter_b, self.output_b, self.norm_b):
                p.zero_()
            self.attn_nw.fill_(1.0)
            self.norm_w.fill_(1.0)

    def load_initial(self, weights: Sequence[torch.Tensor] | None, biases: Sequence[torch.Tensor] | None) -> None:
        """Copy DeepSpeed-ordered weight / bias lists (8 each, see the class docstring) into the parameters."""
        H = self.config.hidden_size
        w_targets = [(self.attn_qkvw, slice(0, H)), (self.attn_qkvw, slice(H, 2 * H)),
                     (self.attn_qkvw, slice(2 * H, 3 * H)), (self.attn_ow, None), (self.attn_nw, None),
                     (self.inter_w, None), (self.output_w, None), (self.norm_w, None)]  # fmt: skip
        b_targets = [(self.attn_qkvb, slice(0, H)), (self.attn_qkvb, slice(H, 2 * H)),
                     (self.attn_qkvb, slice(2 * H, 3 * H)), (self.attn_ob, None), (self.attn_nb, None),
                     (self.inter_b, None), (self.output_b, None), (self.norm_b, None)]  # fmt: skip
        with torch.no_grad():
            for kind, tensors, targets in (
                ("initial_weights", weights, w_targets),
                ("initial_biases", biases, b_targets),
            ):
                if tensors is None:
                    continue
                if len(tensors) != 8:
                    raise ValueError(
                        f"{kind} must hold 8 tensors (Q, K, V, O, attn LN, inter, output, norm), got {len(tensors)}"
                    )
                for i, (t, (p, rows)) in enumerate(zip(tensors, targets, strict=True)):
                    dst = p if rows is None else p[rows]
                    if tuple(t.shape) != tuple(dst.shape):
                        raise ValueError(f"{kind}[{i}] must have shape {tuple(dst.shape)}, got {tuple(t.shape)}")
                    dst.copy_(t)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"hidden={c.hidden_size}, heads={c.heads}, intermediate={c.intermediate_size}, "
            f"{'pre' if c.pre_layer_norm else 'post'}-LN, dropout(attn={c.attn_dropout_ratio}, "
            f"hidden={c.hidden_dropout_ratio}), gelu={c.gelu_approximate}, normalize_invertible="
            f"{c.normalize_invertible}, gelu_checkpoint={c.gelu_checkpoint}, attn_dropout_checkpoint="
            f"{c.attn_dropout_checkpoint}, backend={self.backend}"
        )

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        """hidden_states (B, S, H) -> (B, S, H) (or `(out,)` when `config.return_tuple`).

        `attention_mask`: additive float broadcastable to (B, h, S, S) with batch dim B or 1 ((B, 1, 1, S) as
        DeepSpeed, (B, 1, S, S) as HF eager), boolean 4-D with True = attend (HF sdpa), a (B, S) keep-mask of 0/1
        (bool, int or float), or None. Extra HF/DeepSpeed arguments are accepted when empty (None/False) and
        raise otherwise; other keyword arguments HF passes along (position_ids, use_cache, ...) are ignored.
        """
        _check_extra_args(args, kwargs)
        dtype = self._compute_dtype(hidden_states)
        B, S, _ = hidden_states.shape
        mask = attention_bias(attention_mask, B, S, dtype, hidden_states.device)
        if torch.is_autocast_enabled(hidden_states.device.type):
            # Everything below is cast to autocast's dtype explicitly; autocast itself would run the LayerNorms
            # in fp32 and hand mixed dtypes to the fused ops.
            with torch.autocast(hidden_states.device.type, enabled=False):
                out = self._forward(hidden_states.to(dtype), mask, dtype)
        else:
            out = self._forward(hidden_states, mask, dtype)
        return (out,) if self.config.return_tuple else out

    def _forward(self, x: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        c = self.config
        B, S, H = x.shape
        p_attn = c.attn_dropout_ratio if self.training else 0.0
        p_hid = c.hidden_dropout_ratio if self.training else 0.0
        seed = self._draw_seed() if p_attn > 0.0 or p_hid > 0.0 else None
        P = dict(self.named_parameters())
        if self.attn_qkvw.dtype != dtype:  # autocast: run everything in its dtype (grads flow back to the params)
            P = {n: p.to(dtype) for n, p in P.items()}
        ln_kw = {"eps": c.layer_norm_eps, "invertible": c.normalize_invertible, "backend": self.backend}
        drop_kw = {"dropout_p": p_hid, "seed": seed, "training": self.training}
        gelu_kw = {"approximate": c.gelu_approximate, "checkpoint": c.gelu_checkpoint, "backend": self.backend}
        linear = torch.nn.functional.linear

        # Every bias rides in its GEMM (addmm), so the fused ops get bias=None: one elementwise pass less each way.
        t = layer_norm(x, P["norm_w"], P["norm_b"], **ln_kw) if c.pre_layer_norm else x  # (B, S, H)
        qkv = linear(t, P["attn_qkvw"], P["attn_qkvb"])  # (B, S, 3H)
        q, k, v = qkv.view(B, S, 3, c.heads, c.head_dim).unbind(2)  # each (B, S, h, d), views of qkv
        ctx = attention(
            q,
            k,
            v,
            attn_bias=mask,
            dropout_p=p_attn,
            seed=seed,
            offset=ATTN_PROBS_OFFSET,
            dropout_checkpoint=c.attn_dropout_checkpoint,
            backend=self.backend,
        )  # (B, S, h, d)
        a = linear(ctx.reshape(B, S, H), P["attn_ow"], P["attn_ob"])  # (B, S, H)
        if c.pre_layer_norm:
            # h = x + drop(a) is the last residual; LN(h) feeds the FFN
            h_ln, h = bias_dropout_residual_layer_norm(
                a,
                None,
                x,
                P["attn_nw"],
                P["attn_nb"],
                **ln_kw,
                **drop_kw,
                offset=ATTN_OUT_OFFSET,
                return_residual_out=True,
            )
            ff1 = linear(h_ln, P["inter_w"], P["inter_b"])  # (B, S, I), GELU input
            o = bias_gelu_linear(ff1, None, P["output_w"], P["output_b"], **gelu_kw)  # (B, S, H)
            return h + self._ffn_dropout(o, p_hid, seed)  # (B, S, H)
        h = bias_dropout_residual_layer_norm(
            a, None, x, P["attn_nw"], P["attn_nb"], **ln_kw, **drop_kw, offset=ATTN_OUT_OFFSET
        )  # (B, S, H) = LN(x + drop(a))
        ff1 = linear(h, P["inter_w"], P["inter_b"])  # (B, S, I), GELU input
        o = bias_gelu_linear(ff1, None, P["output_w"], P["output_b"], **gelu_kw)  # (B, S, H)
        return bias_dropout_residual_layer_norm(
            o, None, h, P["norm_w"], P["norm_b"], **ln_kw, **drop_kw, offset=FFN_OUT_OFFSET
        )  # (B, S, H) = LN(h + drop(o))

    def _ffn_dropout(self, o: torch.Tensor, p: float, seed: int | None) -> torch.Tensor:
        """Pre-LN's last dropout (no LayerNorm follows, so no fused op): the seeded bool mask (1 byte per element
        saved), or torch's native dropout in stochastic mode."""
        if p == 0.0:
            return o
        if self.config.stochastic_mode:
            return torch.nn.functional.dropout(o, p, training=True)
        keep = keep_mask(tuple(o.shape), p, seed, o.device, FFN_OUT_OFFSET)
        return o * keep * (1.0 / (1.0 - p))

    def _draw_seed(self) -> int:
        return new_seed(self.generator)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """Check `x` against the layer; the dtype everything runs in (autocast's when it is on)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"hidden_states must be a torch.Tensor, got {type(x).__name__}")
        H = self.config.hidden_size
        if x.dim() != 3 or x.shape[-1] != H:
            raise ValueError(f"hidden_states must have shape (B, S, {H}), got {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"hidden_states must have B >= 1 and S >= 1, got {tuple(x.shape)}")
        w = self.attn_qkvw
        if x.device != w.device:
            raise ValueError(f"hidden_states is on {x.device} but the layer's parameters are on {w.device}")
        if not x.is_floating_point():
            raise TypeError(f"hidden_states must be a floating-point tensor, got {dtype_name(x.dtype)}")
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        if x.dtype != w.dtype:
            raise TypeError(
                f"hidden_states dtype {dtype_name(x.dtype)} does not match the layer's parameters "
                f"({dtype_name(w.dtype)}); convert one of them (layer.to(dtype)) or run under "
                f"torch.autocast"
            )
        return x.dtype


def attention_bias(
    mask: torch.Tensor | None, B: int, S: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """Any supported attention mask -> an additive bias broadcastable to (B, h, S, S) in `dtype` (or None).

    Accepted: None; a (B, S) keep-mask (bool, or ints/floats that are all 0 or 1; 1 = attend); a 4-D boolean
    mask, True = attend (HF sdpa); a 4-D float additive mask (DeepSpeed (B, 1, 1, S), HF eager (B, 1, S, S)).
    In 4-D masks the batch dim is B or 1, the head dim 1 (or h: checked by the attention op), the query dim 1 or S,
    the key dim S. Masked keys get -inf; a query row with every key masked yields zeros.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.device != device:
        raise ValueError(f"attention_mask is on {mask.device} but hidden_states is on {device}")
    if mask.dim() == 2:
        if tuple(mask.shape) != (B, S):
            raise ValueError(f"a 2-D attention_mask is a (B, S) = ({B}, {S}) keep-mask, got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(
                    "a 2-D attention_mask is a keep-mask and must hold only 0 and 1 (1 = attend); "
                    "pass an additive mask as (B, 1, 1, S)"
                )
            mask = mask != 0
        mask = mask.view(B, 1, 1, S)
    elif mask.dim() == 4:
        b, _, sq, sk = mask.shape
        if b not in (1, B) or sq not in (1, S) or sk != S:
            raise ValueError(
                f"a 4-D attention_mask must have shape (B|1, 1|heads, 1|S, S) with B={B}, S={S}, "
                f"got {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(
                f"a 4-D attention_mask must be additive (float) or boolean (True = attend), got "
                f"{dtype_name(mask.dtype)}"
            )
    else:
        raise ValueError(f"attention_mask must be (B, S) or 4-D (B, 1, 1|S, S), got shape {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)


def _check_extra_args(args: tuple, kwargs: dict) -> None:
    for i, a in enumerate(args):
        if a is not None and a is not False:
            raise NotImplementedError(
                f"TransformerLayer.forward got a {type(a).__name__} as positional argument {i + 3}; only "
                f"(hidden_states, attention_mask) are used (no head mask, cross-attention or KV cache)"
            )
    for name in _UNSUPPORTED_KWARGS:
        v = kwargs.get(name)
        if v is not None and v is not False:
            raise NotImplementedError(
                f"TransformerLayer.forward does not support {name}={type(v).__name__} "
                f"(no head mask, cross-attention, KV cache or attention outputs)"
            )


def _as_config(config) -> TransformerConfig:
    if isinstance(config, TransformerConfig):
        return config
    if isinstance(config, dict):
        return TransformerConfig.from_dict(config)
    if hasattr(config, "hidden_size") and hasattr(config, "heads"):  # DeepSpeed's DeepSpeedTransformerConfig
        return TransformerConfig.from_dict(dict(vars(config)))
    raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")


DeepSpeedTransformerLayer = TransformerLayer
