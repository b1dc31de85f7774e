"""The one place a run's config is checked in full, before any process group starts.

effdist.config checks each field (and what follows from the config alone; load_config runs that).
The checks that need a package's knowledge live in that package and take only the sections they
read. `validate_run` runs them after the config's own and before those that need the world size (the
order `effdist train` always had), so a bad value is reported once, as one line naming the field, and
`effdist train` (and its dry run) exit 2.
"""

from __future__ import annotations

from effdist.config import Config, validate, validate_world_size
from effdist.model.kernel_choice import check_fused_kernels
from effdist.pipeline.schedules import check_pipeline_config


def validate_run(cfg: Config, world_size: int | None = None) -> None:
    """Raise ConfigError naming the first invalid field of `cfg` for a run of `world_size` processes
    (None: the checks that do not need it)."""
    validate(cfg)
    check_fused_kernels(cfg.train.fused_kernels)
    check_pipeline_config(cfg.model, cfg.parallel, cfg.pipeline)
    if world_size is not None:
        validate_world_size(cfg, world_size)
    if cfg.train.engine == "deepspeed" and cfg.deepspeed.config_file is not None:
        from effdist.train.deepspeed_engine import check_config_file

        check_config_file(cfg, world_size)
