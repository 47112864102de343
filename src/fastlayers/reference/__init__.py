"""L0: readable pure-PyTorch references, the oracle of every op (torch and stdlib only)."""

from fastlayers.reference.activations import bias_gelu_linear_ref, bias_gelu_ref, gelu_ref
from fastlayers.reference.attention import attention_ref
from fastlayers.reference.bias_add import nhwc_bias_add_ref
from fastlayers.reference.block_sparse import block_sparse_attention_ref, layout_to_dense_mask
from fastlayers.reference.geglu import bias_geglu_ref, gate_act_ref
from fastlayers.reference.norm import bias_dropout_residual_layer_norm_ref, layer_norm_ref
from fastlayers.reference.quantize import group_dequantize_ref, group_quantize_ref, group_scales_ref
from fastlayers.reference.softmax import masked_softmax_ref
from fastlayers.reference.tokens import (
    gather_mask_ref,
    sample_token_indices,
    token_gather_grad_ref,
    token_gather_ref,
    token_scatter_ref_,
)

__all__ = [
    "gather_mask_ref",
    "group_dequantize_ref",
    "group_quantize_ref",
    "group_scales_ref",
    "nhwc_bias_add_ref",
    "sample_token_indices",
    "token_gather_grad_ref",
    "token_gather_ref",
    "token_scatter_ref_",
    "attention_ref",
    "bias_dropout_residual_layer_norm_ref",
    "bias_geglu_ref",
    "bias_gelu_linear_ref",
    "block_sparse_attention_ref",
    "layout_to_dense_mask",
    "bias_gelu_ref",
    "gate_act_ref",
    "gelu_ref",
    "layer_norm_ref",
    "masked_softmax_ref",
]
