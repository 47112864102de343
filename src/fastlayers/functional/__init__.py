"""L2: public functional ops with backend dispatch, and their autograd Functions.

Importing this package registers every op's backends (reference, torch, triton).
"""

from fastlayers.functional.attention import attention
from fastlayers.functional.bias_add import nhwc_bias_add
from fastlayers.functional.bias_geglu import bias_geglu
from fastlayers.functional.bias_gelu import bias_gelu, bias_gelu_linear
from fastlayers.functional.block_sparse import block_sparse_attention
from fastlayers.functional.layer_norm import bias_dropout_residual_layer_norm, layer_norm
from fastlayers.functional.quantize import GroupQuantizer, group_dequantize, quantized_linear
from fastlayers.functional.random_ltd import (
    GatherTokens,
    ScatterTokens,
    bert_sample_tokens,
    gpt_sample_tokens,
    token_gather,
    token_scatter_,
)
from fastlayers.functional.softmax import masked_softmax

__all__ = [
    "GatherTokens",
    "GroupQuantizer",
    "group_dequantize",
    "nhwc_bias_add",
    "quantized_linear",
    "ScatterTokens",
    "bert_sample_tokens",
    "gpt_sample_tokens",
    "token_gather",
    "token_scatter_",
    "attention",
    "bias_dropout_residual_layer_norm",
    "block_sparse_attention",
    "bias_geglu",
    "bias_gelu",
    "bias_gelu_linear",
    "layer_norm",
    "masked_softmax",
]
