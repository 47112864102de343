"""L1 kernels: raw Triton kernels with host launchers (`kernels.triton`) and fast plain-PyTorch paths
(`kernels.torch`). No autograd, no nn.Module. Imports nothing eagerly."""
