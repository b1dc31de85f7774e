"""The header of a GPU kernel benchmark's JSON in docs/results: which card, torch, dtype, date and command."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def write_gpu_json(path: str | Path, tool: str, **fields) -> None:
    """Write `fields` after the header (device, torch, dtype bf16, UTC date, the command that ran `tool`)."""
    Path(path).write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "command": f"python tools/{tool} " + " ".join(sys.argv[1:]), **fields}, indent=1))
