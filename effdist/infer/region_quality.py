"""The record of what each EPAS inference region costs a checkpoint: `RUN_DIR/region_quality.json`.

`effdist eval` (effdist.infer.evaluate) writes it: the held-out loss at each region it measured, the region the
checkpoint was trained with and the regions whose loss is within `tolerance` of that region's ("usable").
`effdist generate` reads it for the checkpoint it loads (same step) and warns when asked for a measured region
outside the usable ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

QUALITY_FILE = "region_quality.json"
SCHEMA = "effdist.region_quality.v1"
DEFAULT_TOLERANCE = 0.005


@dataclass(frozen=True)
class RegionQuality:
    path: Path
    step: Optional[int]
    trained_region: int
    losses: dict[int, float]
    tolerance: float
    # The measured checkpoint's `saved_at` (its effdist.json): a run started over (--fresh) or rolled back saves
    # another checkpoint of the same step, which this record says nothing about. None: not known.
    saved_at: Optional[float] = None

    @property
    def usable(self) -> list[int]:
        """The measured regions whose loss is at most (1 + tolerance) x the trained region's."""
        base = self.losses[self.trained_region]
        return sorted(r for r, loss in self.losses.items() if loss <= base * (1 + self.tolerance))

    def excess(self, region: int) -> float:
        """How much higher the loss at `region` is than at the trained region (0.012 = 1.2%)."""
        return self.losses[region] / self.losses[self.trained_region] - 1

    def to_json(self) -> dict:
        out = {"schema": SCHEMA, "step": self.step, "trained_region": self.trained_region,
               "tolerance": self.tolerance, "losses": {str(r): v for r, v in sorted(self.losses.items())},
               "usable_regions": self.usable}
        if self.saved_at is not None:
            out["saved_at"] = self.saved_at
        return out


def quality_path(run_dir: Path) -> Path:
    return Path(run_dir) / QUALITY_FILE


def read_region_quality(run_dir: Optional[Path], step: Optional[int],
                        saved_at: Optional[float] = None) -> Optional[RegionQuality]:
    """The record of the checkpoint at `step` of `run_dir` saved at `saved_at`, or None when there is none for that
    checkpoint (another step, or another checkpoint of that step: a run started over or rolled back since; or none)
    or it cannot be read. A record without `saved_at` (older effdist) is matched by its step."""
    if run_dir is None:
        return None
    path = quality_path(run_dir)
    try:
        data = json.loads(path.read_text())
        if data.get("schema") != SCHEMA or data.get("step") != step:
            return None
        measured = data.get("saved_at")
        if measured is not None and saved_at is not None and float(measured) != float(saved_at):
            return None
        losses = {int(r): float(v) for r, v in data["losses"].items()}
        record = RegionQuality(path, step, int(data["trained_region"]), losses, float(data["tolerance"]),
                               saved_at=None if measured is None else float(measured))
        record.excess(record.trained_region)  # the trained region must be among the measured ones
        return record
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_region_quality(record: RegionQuality) -> Path:
    """Write `record` to its path through a temporary file (a reader never sees half of it)."""
    tmp = record.path.with_name(f".{record.path.name}.tmp")
    tmp.write_text(json.dumps(record.to_json(), indent=1) + "\n")
    tmp.replace(record.path)
    return record.path
