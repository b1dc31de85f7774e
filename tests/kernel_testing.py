"""Setup shared by the sparse-FFN Triton kernel tests (channel_select, sparse24, nm_select).

Without a GPU the Triton kernels run through Triton's CPU interpreter, which must be chosen before
triton is first imported (megatron imports it too): tests/conftest.py does that for the whole session,
and importing this module before the kernel modules does it again for a test module imported on its own.
With a GPU the kernels are compiled and the gpu-marked tests check them there.
"""

from __future__ import annotations

import os

import torch  # (torch does not import triton)

HAVE_CUDA = torch.cuda.is_available()
if not HAVE_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402

from effdist.kernels import triton_interpreter_active  # noqa: E402

INTERPRETING = triton_interpreter_active()
if not INTERPRETING and not HAVE_CUDA:
    # tests/conftest.py sets TRITON_INTERPRET before anything imports triton; without it these kernels
    # could not run on this machine at all, which must fail rather than skip.
    raise RuntimeError("Triton's interpreter is not active on a machine without CUDA: run through pytest "
                       "(tests/conftest.py sets TRITON_INTERPRET=1 first)")

needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason="the gpu tests check the compiled kernels")
requires_gpu = pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU")
