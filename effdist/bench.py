"""`effdist bench NAME [args]`: run tools/bench_NAME.py from a source checkout (benchmarks live in tools/)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def available() -> list[str]:
    return sorted(p.stem[len("bench_"):] for p in TOOLS.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: effdist bench NAME [args...]\n\nbenchmarks: " + (", ".join(names) or f"none found in {TOOLS}"))
        return 0
    name, rest = argv[0], argv[1:]
    # The script's own name (bench_train, tools/bench_train.py) means the same benchmark as its short name.
    name = Path(name).name.removesuffix(".py")
    name = name[len("bench_"):] if name.startswith("bench_") and name[len("bench_"):] in names else name
    script = TOOLS / f"bench_{name}.py"
    if not script.is_file():
        print(f"effdist bench: no benchmark {name!r}; available: {', '.join(names)} (from {TOOLS})", file=sys.stderr)
        return 2
    sys.argv = [str(script), *rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    return 0
