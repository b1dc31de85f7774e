"""The CPU compatibility layer megatron-core needs to run without CUDA: the ``cpu`` patch set of
effdist.runtime.megatron_patches (where every megatron patch is described), under the names the runtime
and tests use. Installed only when effdist runs on the CPU (runtime.setup picks that)."""

from __future__ import annotations

import contextlib

from effdist.runtime.megatron_patches import CPU, install_cpu


def is_installed() -> bool:
    return CPU.installed


def install() -> None:
    """Make megatron-core usable on a machine without CUDA. Idempotent."""
    install_cpu()


def uninstall() -> None:
    """Undo install(), restoring every patched attribute in reverse order."""
    CPU.uninstall()


@contextlib.contextmanager
def installed():
    """Scope the compatibility layer to a block (used by tests)."""
    already = is_installed()
    install()
    try:
        yield
    finally:
        if not already:
            uninstall()
