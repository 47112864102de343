"""Triton kernels and their host launchers: the only package that imports `triton`.

Import a submodule only when a Triton backend is selected. Set TRITON_INTERPRET=1 *before* importing
a kernel module to run it on CPU under the interpreter (tests). Each module lists its default launch
configurations in `AOT_SPECS`, which `aot.py` compiles for sm_80 and sm_90.
"""
