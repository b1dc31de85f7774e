#!/usr/bin/env python
"""Same as `effdist simulate`: predict memory, bubbles and makespan of pipeline schedules.

    python tools/simulate_pipeline.py --compare 1f1b,interleaved,zb-h1,v-min,v-half,v-zb --pp 4 --microbatches 16

See docs/pipeline.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from effdist.pipeline.simulate_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
