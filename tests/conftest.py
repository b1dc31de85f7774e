"""Test-session setup shared by every test module.

Triton kernels run through Triton's interpreter on machines without CUDA. The variable must be set
before triton is first imported anywhere in the process (megatron and effdist.model import it), or the
@triton.jit functions are created in compiled mode and cannot run on CPU tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def megatron_one_process():
    """A gloo world of one process + megatron parallel state (TP=PP=1) + the CPU compatibility layer."""
    from effdist.runtime.distributed import one_process_megatron

    with one_process_megatron(seed=1234):
        yield
