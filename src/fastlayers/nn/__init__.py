"""L3: nn.Modules that own parameters and call the functional ops."""

from fastlayers.nn.diffusers_attention import DeepSpeedDiffusersAttention
from fastlayers.nn.diffusers_block import DeepSpeedDiffusersTransformerBlock, Diffusers2DTransformerConfig
from fastlayers.nn.random_ltd import RandomLayerTokenDrop
from fastlayers.nn.random_ltd_scheduler import RandomLTDScheduler
from fastlayers.nn.sparse_self_attention import BertSparseSelfAttention, SparseSelfAttention
from fastlayers.nn.transformer_layer import TransformerLayer

DeepSpeedTransformerLayer = TransformerLayer

__all__ = [
    "BertSparseSelfAttention",
    "DeepSpeedDiffusersAttention",
    "DeepSpeedDiffusersTransformerBlock",
    "Diffusers2DTransformerConfig",
    "DeepSpeedTransformerLayer",
    "RandomLTDScheduler",
    "RandomLayerTokenDrop",
    "SparseSelfAttention",
    "TransformerLayer",
]
