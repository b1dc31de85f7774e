"""`effdist presets`: the shipped configs (configs/*.yaml) with their size and purpose.

    effdist presets               # name, parameters, shape, purpose
    effdist presets --dir DIR     # another directory of configs

A preset's purpose is the first sentence of the comment block at the top of its YAML file; its parameter
count comes from the same formula the dry run uses (effdist.train.estimate.total_parameters).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from effdist.config import PRESET_DIR, ConfigError, load_config
from effdist.runtime.cli_parser import ArgumentParser
from effdist.train.estimate import total_parameters


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path
    parameters: int
    layers: int
    hidden: int
    seq_length: int
    purpose: str


def purpose_of(text: str) -> str:
    """The first sentence of the leading comment block of a YAML file ('' without one)."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    block = " ".join(x for x in lines if x)
    match = re.match(r"(.+?[.!?])(\s|$)", block)
    return match.group(1) if match else block


def list_presets(directory: Path = PRESET_DIR) -> list[Preset]:
    out = []
    for path in sorted(directory.glob("*.yaml")):
        cfg = load_config(path)
        out.append(Preset(path.stem, path, total_parameters(cfg), cfg.model.num_layers, cfg.model.hidden_size,
                          cfg.data.seq_length, purpose_of(path.read_text())))
    return sorted(out, key=lambda p: p.parameters)


def format_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def markdown_table(presets: list[Preset], root: Path | None = None) -> str:
    """The presets as a Markdown table (docs/configs.md is generated from it)."""
    rows = ["| preset | parameters | layers × hidden | sequence | purpose |", "|---|---|---|---|---|"]
    for p in presets:
        path = p.path.relative_to(root) if root else p.path
        rows.append(f"| `{path}` | {format_count(p.parameters)} | {p.layers} × {p.hidden} | {p.seq_length} | "
                    f"{p.purpose} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="effdist presets", description="List the shipped configs with their "
                            "parameter counts and purpose.")
    parser.add_argument("--dir", type=Path, default=PRESET_DIR, help=f"directory of configs (default {PRESET_DIR})")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        print(f"effdist presets: --dir {args.dir}: no such directory", file=sys.stderr)
        return 2
    try:
        presets = list_presets(args.dir)
    except ConfigError as e:
        print(f"effdist presets: config error: {e}", file=sys.stderr)
        return 2
    width = max([len(p.name) for p in presets] + [6])
    print(f"{'preset':<{width}}  {'params':>7}  {'layers x hidden':>15}  {'seq':>5}  purpose")
    for p in presets:
        print(f"{p.name:<{width}}  {format_count(p.parameters):>7}  {f'{p.layers} x {p.hidden}':>15}  "
              f"{p.seq_length:>5}  {p.purpose}")
    where = os.path.relpath(args.dir)
    if where.startswith(".."):  # outside the working directory: '../../x/configs' is no help there
        where = str(args.dir.resolve())
    # a shipped preset loads by its name from any directory
    name = "NAME" if args.dir.resolve() == Path(PRESET_DIR).resolve() else f"{where}/NAME.yaml"
    counted = f"{len(presets)} preset{'s' if len(presets) != 1 else ''}"
    print(f"\n{counted} in {where}; see one's plan with `effdist train --config {name} --dry-run`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
