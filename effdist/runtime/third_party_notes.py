"""Silence, by exact message, the notes third-party libraries print on every start that say nothing
about an effdist run. Each entry says why it is harmless; anything else still reaches the user.

Installed when the `effdist` package is imported (effdist/__init__.py), before megatron-core is
imported, because megatron emits most of these at import time. Never a blanket filter: a new or changed
message from the same library is shown.
"""

from __future__ import annotations

import logging
import re
import warnings

# megatron-core warns when NVIDIA's Transformer Engine and Apex are missing (always on CPU, often on
# GPU). effdist uses neither: its layer specs use megatron's local (non-TE) linears, its own RMSNorm
# and its own AdamW with its own gradient norm, so megatron's fused fallbacks named here are never on
# effdist's path.
TE_APEX_MISSING = (
    "Transformer Engine and Apex are not installed. Falling back to local implementations of "
    "multi_tensor_applier and multi_tensor_scale",
    "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
    "Transformer Engine and Apex are not installed. Falling back to local implementations of "
    "multi_tensor_applier, multi_tensor_l2norm, and multi_tensor_scale",
    "Apex is not installed. Falling back to Torch Norm",
)

# megatron's TransformerLayer passes its TP group only to an MLP whose class is exactly megatron's MLP
# and logs this for any other class, such as effdist's FFNs (all MLP subclasses). They are built with
# tp_group=None, for which megatron's MLP takes parallel_state's tensor-parallel group: the very group
# TransformerLayer would have passed, since effdist never builds layers with other process groups.
UNKNOWN_MLP_TYPE = ("Unknown MLP type: <class 'megatron.core.transformer.spec_utils.ModuleSpec'>. "
                    "Using default kwargs.")
UNKNOWN_MLP_LOGGER = "megatron.core.transformer.transformer_layer"

# megatron-core's dist_checkpointing loads through torch.distributed.checkpoint APIs that torch deprecates
# (`load_state_dict`, torch's ShardedTensor); torch says so on every checkpoint load (resume, init_from,
# `effdist convert`, `effdist generate`). Nothing for an effdist user to act on: megatron-core (pinned below
# 0.17) makes the calls, and effdist's tests load checkpoints through them with this torch.
DCP_DEPRECATIONS = (
    "`load_state_dict` is deprecated and will be removed in future versions. Please use `load` instead.",
    "Please use DTensor instead and we are deprecating ShardedTensor.",
)
DCP_DEPRECATION_MODULES = r"(megatron\.core|torch\.distributed)\."

# torch 2.13 renames the tensor collectives (`*_single`); megatron-core 0.16 calls the old names for every
# sequence-parallel all-gather and reduce-scatter, one warning per rank and start. effdist's own calls use the new
# names where torch has them (effdist.runtime.distributed.all_gather_single / reduce_scatter_single).
COLLECTIVE_RENAMES = (
    "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use `torch.distributed.reduce_scatter_single` "
    "instead.",
    "`torch.distributed.all_gather_into_tensor` is deprecated. Please use `torch.distributed.all_gather_single` "
    "instead.",
)


class _DropExactMessages(logging.Filter):
    def __init__(self, messages: tuple[str, ...]):
        super().__init__()
        self.messages = frozenset(messages)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in self.messages


_installed = False


def install() -> None:
    """Install the filters (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    for message in TE_APEX_MISSING:
        warnings.filterwarnings("ignore", message=re.escape(message) + r"\Z", category=UserWarning,
                                module=r"megatron\.core\.")
    for message in DCP_DEPRECATIONS + COLLECTIVE_RENAMES:
        warnings.filterwarnings("ignore", message=re.escape(message) + r"\Z", category=FutureWarning,
                                module=DCP_DEPRECATION_MODULES)
    logging.getLogger(UNKNOWN_MLP_LOGGER).addFilter(_DropExactMessages((UNKNOWN_MLP_TYPE,)))
