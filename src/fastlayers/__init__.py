"""fastlayers: fast, drop-in transformer building blocks for PyTorch, with DeepSpeed's public names.

Imports no triton and queries no device at import time. Migrating from DeepSpeed is a change of import:
`from deepspeed import DeepSpeedTransformerLayer` -> `from fastlayers import DeepSpeedTransformerLayer`.
"""

__version__ = "0.1.0"

from fastlayers import functional  # noqa: E402  (importing it registers every op's backends)
from fastlayers.backends import explain  # noqa: E402
from fastlayers.configs import DeepSpeedTransformerConfig, TransformerConfig  # noqa: E402
from fastlayers.inference_config import DeepSpeedInferenceConfig  # noqa: E402
from fastlayers.integrations.diffusers import generic_injection  # noqa: E402
from fastlayers.integrations.random_ltd import (  # noqa: E402
    convert_to_random_ltd,
    random_ltd_initialize,
    remove_random_ltd_state_dict,
    save_without_random_ltd,
)
from fastlayers.integrations.sparse_attention_utils import SparseAttentionUtils  # noqa: E402
from fastlayers.memory import saved_activation_bytes  # noqa: E402
from fastlayers.nn import (  # noqa: E402
    BertSparseSelfAttention,
    DeepSpeedDiffusersAttention,
    DeepSpeedDiffusersTransformerBlock,
    DeepSpeedTransformerLayer,
    Diffusers2DTransformerConfig,
    RandomLayerTokenDrop,
    RandomLTDScheduler,
    SparseSelfAttention,
    TransformerLayer,
)
from fastlayers.sparsity_config import (  # noqa: E402
    BigBirdSparsityConfig,
    BSLongformerSparsityConfig,
    DenseSparsityConfig,
    FixedSparsityConfig,
    LocalSlidingWindowSparsityConfig,
    SparsityConfig,
    VariableSparsityConfig,
    to_block_mask,
)

__all__ = [
    "BertSparseSelfAttention",
    "DeepSpeedDiffusersAttention",
    "DeepSpeedDiffusersTransformerBlock",
    "DeepSpeedInferenceConfig",
    "Diffusers2DTransformerConfig",
    "BigBirdSparsityConfig",
    "BSLongformerSparsityConfig",
    "DeepSpeedTransformerConfig",
    "DeepSpeedTransformerLayer",
    "DenseSparsityConfig",
    "FixedSparsityConfig",
    "LocalSlidingWindowSparsityConfig",
    "RandomLTDScheduler",
    "RandomLayerTokenDrop",
    "SparseAttentionUtils",
    "SparseSelfAttention",
    "SparsityConfig",
    "TransformerConfig",
    "TransformerLayer",
    "VariableSparsityConfig",
    "convert_to_random_ltd",
    "explain",
    "functional",
    "generic_injection",
    "random_ltd_initialize",
    "remove_random_ltd_state_dict",
    "save_without_random_ltd",
    "saved_activation_bytes",
    "to_block_mask",
    "__version__",
]
