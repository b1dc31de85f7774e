"""effdist.runtime.megatron_patches: every megatron-core patch is undone exactly by uninstall, nothing is
patched by importing effdist, and every piece of megatron a patch or an override relies on still has the
source it was checked against (megatron-core 0.16.1): this test fails when megatron changes it."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from effdist.runtime import megatron_patches as mp
from tests.launching import clean_env

ROOT = Path(__file__).resolve().parents[1]


def test_relied_on_megatron_code_is_unchanged():
    changed = mp.changed_reliances()
    assert not changed, "megatron-core changed what effdist patches or overrides:\n" + "\n".join(changed)


def test_fingerprint_sees_a_changed_function(monkeypatch):
    from megatron.core.models.common.embeddings import rope_utils

    target = "megatron.core.models.common.embeddings.rope_utils:apply_rotary_pos_emb"
    before = mp.source_sha256(target)

    def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None):  # a "new release"
        return t

    monkeypatch.setattr(rope_utils, "apply_rotary_pos_emb", apply_rotary_pos_emb)
    assert mp.source_sha256(target) != before
    assert any(line.startswith(target) and "rope-slot" in line for line in mp.changed_reliances())


def test_every_override_in_effdist_is_listed():
    """The classes that override a private megatron method name the method in RELIANCES."""
    from effdist.model.fp8 import Fp8ColumnParallelLinear, Fp8RowParallelLinear
    from effdist.model.fused import FusedLossGPTModel
    from effdist.model.shared_qk import EpasSelfAttention

    listed = {r.target.split(":")[1] for r in mp.RELIANCES}
    for cls in (FusedLossGPTModel, EpasSelfAttention, Fp8ColumnParallelLinear, Fp8RowParallelLinear):
        ours = {name for c in cls.__mro__ if c.__module__.startswith("effdist.") for name, value in vars(c).items()
                if name.startswith("_") and not name.startswith("__") and callable(value)}
        for name in sorted(ours):
            owner = next((c for c in cls.__mro__ if c.__module__.startswith("megatron.") and name in vars(c)), None)
            if owner is not None:
                assert f"{owner.__name__}.{name}" in listed, \
                    f"{cls.__name__}.{name} overrides megatron's {owner.__name__}.{name}, which RELIANCES omits"
    assert "GPTModel._postprocess" in listed and "ColumnParallelLinear._forward_impl" in listed


def test_version_outside_the_checked_range_is_named():
    mp.check_version("0.16.1")
    mp.check_version("0.16.3")
    for bad in ("0.15.0", "0.17.0", "1.0.0"):
        with pytest.raises(mp.MegatronVersionError, match=rf"^megatron-core {bad}: .* checked against 0\.16\.1"):
            mp.check_version(bad)


def _snapshot():
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.tensor_parallel import layers
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.transformer import transformer_block, transformer_layer

    owners = {"transformer_layer": transformer_layer, "transformer_block": transformer_block,
              "rope_utils": rope_utils, "layers": layers, "mrandom": mrandom, "torch.cuda": torch.cuda,
              "filesystem_async": filesystem_async}
    names = ["get_transformer_layer_offset", "fused_apply_rotary_pos_emb", "fused_weight_gradient_mlp_cuda",
             "_grad_accum_fusion_available", "_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED",
             "_get_cuda_rng_state", "_set_cuda_rng_state", "initialize_rng_tracker", "current_device", "synchronize",
             "_get_write_results_queue"]
    state = {(o, n): getattr(owner, n, "<absent>") for o, owner in owners.items() for n in names if hasattr(owner, n)
             or n == "fused_weight_gradient_mlp_cuda"}
    state["sys.modules"] = sys.modules.get("fused_weight_gradient_mlp_cuda", "<absent>")
    return state


def _install_then_uninstall_restores_every_attribute():
    before = _snapshot()
    extension = types.ModuleType("fused_weight_gradient_mlp_cuda")
    kernel = lambda *a, **k: None  # noqa: E731
    for _ in range(2):  # idempotent
        mp.install_layer_offset()
        mp.install_cpu()
    assert mp.fill_rope_slot(kernel) is True
    assert mp.fill_wgrad_extension(extension) is True and mp.fill_wgrad_extension(extension) is True
    with mp.write_results_in_process():
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        # A synchronous save's results stay in this process: no manager is started for them.
        assert type(filesystem_async._get_write_results_queue()).__module__ == "queue"
        assert filesystem_async._results_queue is None
    # The trainer binds the asynchronous saves' manager after such a save installed the patch without one.
    mp.install_write_results(initializer=print, initargs=("bound",))
    assert mp._manager_initializer == (print, ("bound",))
    assert mp.installed_patches() == ["layer-offset", "rope-slot", "wgrad-extension", "cpu", "write-results"]
    after = _snapshot()
    changed = {k[1] if isinstance(k, tuple) else k for k in before if before[k] is not after[k]}
    assert changed == {
        "get_transformer_layer_offset", "fused_apply_rotary_pos_emb", "fused_weight_gradient_mlp_cuda",
        "_grad_accum_fusion_available", "_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED",
        "_get_cuda_rng_state", "_set_cuda_rng_state", "initialize_rng_tracker", "current_device", "synchronize",
        "_get_write_results_queue", "sys.modules"}, changed
    from megatron.core.transformer import transformer_layer

    assert transformer_layer.get_transformer_layer_offset(types.SimpleNamespace(effdist_layer_offset=5)) == 5
    # While patched, the fingerprints still read megatron's originals.
    assert mp.changed_reliances() == []
    mp.uninstall_all()
    assert mp.installed_patches() == []
    restored = _snapshot()
    assert all(before[k] is restored[k] for k in before), [k for k in before if before[k] is not restored[k]]


def fresh_process_checks():
    """Run in a new interpreter: importing effdist patches nothing; install then uninstall restores everything."""
    import effdist.model.fused  # noqa: F401
    import effdist.model.gpt  # noqa: F401
    import effdist.model.shared_qk  # noqa: F401
    import effdist.model.wgrad_fusion  # noqa: F401
    import effdist.pipeline.executor  # noqa: F401
    import effdist.train.trainer  # noqa: F401

    assert mp.installed_patches() == [], mp.installed_patches()
    _install_then_uninstall_restores_every_attribute()
    print("clean")


def _in_a_new_interpreter(checks: str) -> str:
    """Run this module's function `checks` in a fresh interpreter (nothing imported yet); its stdout."""
    code = f"from tests.test_megatron_patches import {checks}; {checks}()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), timeout=600,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_patches_install_only_when_asked_and_uninstall_exactly():
    assert _in_a_new_interpreter("fresh_process_checks").endswith("clean")


def lazy_jit_checks():
    """Run in a new interpreter: megatron imported through import_megatron compiles nothing at import, and the
    lazy torch.compile behaves as torch.compile from the first call on."""
    import torch.nn as nn

    mp.import_megatron()
    from megatron.core import jit

    assert "torch._inductor" not in sys.modules, "megatron's import compiled its fusions"
    assert torch.compile.__module__ == "torch" and jit.jit_fuser.__name__ == "lazy_compile"

    def double(x):
        return 2 * x

    with mp._lazy_torch_compile():
        lazy = torch.compile(double, backend="eager")
        decorated = torch.compile(backend="eager")(double)
        module = torch.compile(nn.Identity(), backend="eager")
    assert lazy.__name__ == "double" and lazy is not double
    for f in (lazy, decorated):
        assert torch.equal(f(torch.arange(3.0)), torch.tensor([0.0, 2.0, 4.0]))
    assert isinstance(module, nn.Module)  # not wrapped: compiled as torch does
    print("lazy")


def test_megatron_imports_without_compiling_its_fusions():
    assert _in_a_new_interpreter("lazy_jit_checks").endswith("lazy")
