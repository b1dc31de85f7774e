"""The CPU compatibility layer is scoped (uninstall restores everything) and does what megatron needs."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from tests.launching import ROOT, clean_env


def test_install_and_uninstall_restore_every_patch():
    # In a fresh process: other tests in this session may already have installed the layer.
    script = textwrap.dedent("""
        import torch
        from megatron.core.tensor_parallel import random as mrandom
        from effdist.runtime import cpu_compat
        before = (torch.cuda.current_device, torch.cuda.synchronize, mrandom._CUDA_RNG_STATE_TRACKER,
                  mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state, mrandom.initialize_rng_tracker)
        with cpu_compat.installed():
            assert cpu_compat.is_installed()
            assert torch.cuda.current_device() == torch.device("cpu")
            torch.cuda.synchronize()  # a no-op now, not "Torch not compiled with CUDA"
            x = torch.empty(3, device=torch.cuda.current_device())
            assert x.device.type == "cpu"
            # The tracker forks the CPU generator: a named stream is independent of the default one.
            tracker = mrandom.get_cuda_rng_tracker()
            tracker.reset()
            tracker.add("a", 123)
            torch.manual_seed(0)
            outside = torch.rand(2)
            torch.manual_seed(0)
            with tracker.fork("a"):
                inside_1 = torch.rand(2)
            after = torch.rand(2)
            assert torch.equal(after, outside), "forking must leave the default stream where it was"
            with tracker.fork("a"):
                inside_2 = torch.rand(2)
            assert not torch.equal(inside_1, inside_2), "the named stream must advance"
            torch.manual_seed(123)
            assert torch.equal(inside_1, torch.rand(2)), "the named stream starts from its own seed"
        assert not cpu_compat.is_installed()
        now = (torch.cuda.current_device, torch.cuda.synchronize, mrandom._CUDA_RNG_STATE_TRACKER,
               mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state, mrandom.initialize_rng_tracker)
        assert all(a is b for a, b in zip(before, now)), "uninstall did not restore an attribute"
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_device_choice_respects_config():
    from effdist.config import ConfigError, load_config
    from effdist.runtime.distributed import choose_device, choose_dtype

    cfg = load_config(None, ["parallel.device=cpu"])
    device, backend = choose_device(cfg)
    assert device.type == "cpu" and backend == "gloo"
    assert choose_dtype(cfg, device) == torch.float32
    if not torch.cuda.is_available():
        cfg = load_config(None, ["parallel.device=cuda"])
        try:
            choose_device(cfg)
        except ConfigError as e:
            assert "parallel.device" in str(e) and "no CUDA GPU" in str(e)
        else:
            raise AssertionError("asking for cuda without a GPU must fail with a named error")
