"""Without a GPU, Triton kernels run under the interpreter. Triton 3.9 decides that when `import triton` runs
(its own tl.sum/tl.max are jit functions) and at each @triton.jit, from TRITON_INTERPRET, so it is set here,
before any test module of this directory imports triton or ember code that might."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
