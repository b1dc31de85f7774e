"""Test-session setup shared by every test module.

Triton kernels run through Triton's interpreter on machines without CUDA. The variable must be set
before triton is first imported anywhere in the process (megatron and effdist.model import it), or the
@triton.jit functions are created in compiled mode and cannot run on CPU tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
