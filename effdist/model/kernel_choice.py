"""``train.fused_kernels``: the names of effdist's fused pieces and how the setting reads.

Kept apart from effdist.model.fused (which imports megatron-core and the Triton kernels) so that
config checks before any process group (effdist.train.preflight, the dry run) cost no heavy import.
"""

from __future__ import annotations

from effdist.config import ConfigError

FUSED_KERNELS = ("rmsnorm", "rope", "swiglu", "loss", "wgrad")


def fused_kernel_set(setting) -> frozenset[str]:
    """``train.fused_kernels`` as the set of pieces to use: true = all of FUSED_KERNELS, false (or an
    empty list) = none (megatron's code paths exactly), or a list of names (one lever at a time)."""
    if setting is True:
        return frozenset(FUSED_KERNELS)
    if setting is False or setting is None:
        return frozenset()
    if isinstance(setting, str):
        setting = [name.strip() for name in setting.split(",") if name.strip()]
    names = frozenset(setting)
    unknown = names - set(FUSED_KERNELS)
    if unknown:
        raise ValueError(f"train.fused_kernels = {sorted(names)}: unknown {', '.join(sorted(unknown))}; expected "
                         f"true, false or a list of {', '.join(FUSED_KERNELS)}")
    return names


def check_fused_kernels(setting) -> None:
    """ConfigError (one line naming train.fused_kernels) when the setting names an unknown piece."""
    try:
        fused_kernel_set(setting)
    except ValueError as e:
        raise ConfigError(str(e)) from None
