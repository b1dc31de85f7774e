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


# Seconds each of the slowest files took in a full run on 2 CPU cores (`-n 2 --dist loadfile --durations=0`, summed
# per file; rounded). Files run longest first, so that two xdist workers finish together: pytest-xdist hands out
# whole files in order, by default the files with the most tests first, which left the few-test multi-process files
# (test_reliability, test_train_distributed, ...) for the end, one worker idle meanwhile. Files not listed follow
# in collection order. A stale entry costs only balance, never a test.
SLOW_FILES = {
    "test_run_safety.py": 300, "test_deepspeed.py": 230, "test_fp8.py": 180, "test_process_lifecycle.py": 120,
    "test_pipeline_executor.py": 105, "test_train_distributed.py": 100, "test_reliability.py": 95,
    "test_readme.py": 90, "test_epas_adaptive.py": 70, "test_epas_train.py": 65, "test_slurm.py": 55,
    "test_tools_smoke.py": 50, "test_generate.py": 40, "test_console.py": 35, "test_launch_env.py": 35,
    "test_kernels_dense.py": 30, "test_kernels_topk_select.py": 30, "test_continual_pretraining.py": 27,
    "test_planner.py": 27, "test_ffn_train.py": 24, "test_sparse_decode.py": 23, "test_kernels_channel_select.py": 22,
}


def pytest_configure(config):
    # With --dist loadfile, hand the files out in collection order (set below) rather than by number of tests.
    if getattr(config.option, "dist", None) == "loadfile" and hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    first = {}
    for i, item in enumerate(items):
        first.setdefault(item.path, i)
    items.sort(key=lambda item: (-SLOW_FILES.get(item.path.name, 0), first[item.path]))
