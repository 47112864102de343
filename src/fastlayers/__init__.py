"""fastlayers: fast, drop-in transformer building blocks for PyTorch (DeepSpeed-compatible names).

Imports no triton and queries no device at import time.
"""

__version__ = "0.1.0"

from fastlayers import functional  # noqa: E402,F401  (registers every op's backends)
from fastlayers.backends import explain  # noqa: E402
from fastlayers.memory import saved_activation_bytes  # noqa: E402

__all__ = ["explain", "saved_activation_bytes", "functional", "__version__"]
