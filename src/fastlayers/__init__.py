"""fastlayers: fast, drop-in transformer building blocks for PyTorch, with DeepSpeed's public names.

Imports no triton and queries no device at import time. Migrating from DeepSpeed is a change of import:
`from deepspeed import DeepSpeedTransformerLayer` -> `from fastlayers import DeepSpeedTransformerLayer`.
"""

__version__ = "0.1.0"

from fastlayers import functional  # noqa: E402  (importing it registers every op's backends)
from fastlayers.backends import explain  # noqa: E402
from fastlayers.configs import DeepSpeedTransformerConfig, TransformerConfig  # noqa: E402
from fastlayers.integrations.sparse_attention_utils import SparseAttentionUtils  # noqa: E402
from fastlayers.memory import saved_activation_bytes  # noqa: E402
from fastlayers.nn import (  # noqa: E402
    BertSparseSelfAttention,
    DeepSpeedTransformerLayer,
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
    "BigBirdSparsityConfig",
    "BSLongformerSparsityConfig",
    "DeepSpeedTransformerConfig",
    "DeepSpeedTransformerLayer",
    "DenseSparsityConfig",
    "FixedSparsityConfig",
    "LocalSlidingWindowSparsityConfig",
    "SparseAttentionUtils",
    "SparseSelfAttention",
    "SparsityConfig",
    "TransformerConfig",
    "TransformerLayer",
    "VariableSparsityConfig",
    "explain",
    "functional",
    "saved_activation_bytes",
    "to_block_mask",
    "__version__",
]
