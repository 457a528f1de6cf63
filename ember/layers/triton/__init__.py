"""Triton kernels for CUDA (also runnable on CPU tensors through the Triton interpreter, for tests)."""
