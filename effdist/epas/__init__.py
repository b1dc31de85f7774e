"""EPAS: progressive Q/K activation sharing.

schedule.py   step -> sharing region (a pure function, identical on every rank)
controller.py switches a rank's layers at step boundaries, keeps Wq/Wk of sharing layers frozen,
              saves/restores the region in checkpoints; set_region for inference
The layers themselves: effdist.model.shared_qk (chosen by effdist.model.spec when epas.enabled).
"""

from effdist.epas.controller import EpasController, set_region
from effdist.epas.schedule import (
    blend_factors,
    boundary_needs_qk,
    check_schedule,
    final_region_size,
    join_step,
    layers_of_region,
    qk_uses,
    region_size,
    sharing_layers,
    steps_to_final_region,
)
from effdist.model.shared_qk import EpasError, apply_region, current_region, pop_exported_qk, qk_context_shape

__all__ = [
    "EpasController", "EpasError", "apply_region", "blend_factors", "boundary_needs_qk", "check_schedule", "current_region",
    "final_region_size", "join_step", "layers_of_region", "pop_exported_qk", "qk_context_shape", "qk_uses", "region_size", "set_region",
    "sharing_layers", "steps_to_final_region",
]
