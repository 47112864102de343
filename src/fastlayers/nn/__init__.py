"""L3: nn.Modules that own parameters and call the functional ops."""

from fastlayers.nn.random_ltd import RandomLayerTokenDrop
from fastlayers.nn.random_ltd_scheduler import RandomLTDScheduler
from fastlayers.nn.sparse_self_attention import BertSparseSelfAttention, SparseSelfAttention
from fastlayers.nn.transformer_layer import TransformerLayer

DeepSpeedTransformerLayer = TransformerLayer

__all__ = [
    "BertSparseSelfAttention",
    "DeepSpeedTransformerLayer",
    "RandomLTDScheduler",
    "RandomLayerTokenDrop",
    "SparseSelfAttention",
    "TransformerLayer",
]
