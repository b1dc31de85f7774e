#!/usr/bin/env python
"""Write the doc tables that come from code, so they cannot drift from it.

    python tools/render_docs.py           # rewrite every generated block
    python tools/render_docs.py --check   # exit 1 naming each stale block (tests/test_render_docs.py runs this)

A generated block sits in its doc between two marker lines:

    <!-- generated:NAME -->
    ...written by the generator registered for (doc, NAME); edits here are overwritten...
    <!-- end generated:NAME -->

To add a table: write a function returning the block's text (without the marker lines) and register it with
`@generated("docs/some.md", "NAME")`; put the two marker lines in the doc, run this script.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


@dataclass(frozen=True)
class Generated:
    doc: str  # path relative to the repository root
    name: str
    render: Callable[[], str]


REGISTRY: list[Generated] = []


def generated(doc: str, name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    def register(fn: Callable[[], str]) -> Callable[[], str]:
        if any(g.doc == doc and g.name == name for g in REGISTRY):
            raise ValueError(f"{doc}: generated block {name!r} registered twice")
        REGISTRY.append(Generated(doc, name, fn))
        return fn
    return register


class MarkerError(ValueError):
    pass


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- generated:{name} -->", f"<!-- end generated:{name} -->"


def replace_block(text: str, name: str, body: str, doc: str = "doc") -> str:
    """`text` with the lines between NAME's markers replaced by `body` (markers keep their indentation)."""
    begin, end = _markers(name)
    pattern = re.compile(rf"^([ \t]*){re.escape(begin)}[ \t]*\n(.*?)^[ \t]*{re.escape(end)}[ \t]*$", re.S | re.M)
    matches = list(pattern.finditer(text))
    if len(matches) != 1:
        raise MarkerError(f"{doc}: expected one block between '{begin}' and '{end}', found {len(matches)}")
    m = matches[0]
    indent = m.group(1)
    block = f"{indent}{begin}\n{body.rstrip()}\n{indent}{end}"
    return text[:m.start()] + block + text[m.end():]


def render_all(root: Path = ROOT) -> dict[Path, tuple[str, str]]:
    """doc path -> (current text, rendered text), for every doc with a registered block."""
    out: dict[Path, tuple[str, str]] = {}
    for g in REGISTRY:
        path = root / g.doc
        current, text = out.get(path, (None, None))
        if current is None:
            current = text = path.read_text()
        out[path] = (current, replace_block(text, g.name, g.render(), g.doc))
    return out


def stale_blocks(root: Path = ROOT) -> list[str]:
    stale = []
    for g in REGISTRY:
        text = (root / g.doc).read_text()
        if replace_block(text, g.name, g.render(), g.doc) != text:
            stale.append(f"{g.doc}: generated:{g.name}")
    return stale


# ---------------------------------------------------------------------- the generators

def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line if line else line for line in text.splitlines())


SIMULATE_COMPARE = ["--compare", "1f1b,interleaved,zb-h1,v-min,v-half,v-zb", "--pp", "4", "--microbatches", "16",
                    "--model", "configs/llama-1b.yaml"]


@generated("docs/pipeline.md", "simulate-compare")
def simulate_compare() -> str:
    """The `effdist simulate --compare` example: the command and what it prints today."""
    from effdist.pipeline.simulate_cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.chdir(ROOT):
        rc = main(SIMULATE_COMPARE)
    if rc != 0:
        raise RuntimeError(f"effdist simulate {' '.join(SIMULATE_COMPARE)} exited with {rc}")
    command = f"effdist simulate {' '.join(SIMULATE_COMPARE[:6])} \\\n    {' '.join(SIMULATE_COMPARE[6:])}"
    return _indent(f"```\n{command}\n```\n\n```\n{out.getvalue().rstrip()}\n```", "   ")


@generated("docs/pipeline.md", "simulate-json")
def simulate_json() -> str:
    """The `--json` example (one schedule, rank 0 shown), with the numbers `effdist simulate` writes today."""
    import json
    import tempfile

    from effdist.pipeline.simulate_cli import main

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), contextlib.chdir(ROOT):
        path = Path(tmp) / "out.json"
        rc = main(["--schedule", "v-half", "--pp", "4", "--microbatches", "16", "--model", "configs/llama-1b.yaml",
                   "--json", str(path)])
        data = json.loads(path.read_text())
    if rc != 0:
        raise RuntimeError(f"effdist simulate --schedule v-half exited with {rc}")

    def compact(d: dict) -> str:
        return ", ".join(f'"{k}": {round(v, 4) if isinstance(v, float) else json.dumps(v)}' for k, v in d.items())

    head = {k: v for k, v in data.items() if k not in ("costs", "ranks", "peak_activation_bytes")}
    keys = list(head)
    lines = ["{" + compact({k: head[k] for k in keys[:4]}) + ",",
             " " + compact({k: head[k] for k in keys[4:]}) + ",",
             f' "peak_activation_bytes": {data["peak_activation_bytes"]},',
             ' "costs": {' + compact(data["costs"]) + "},",
             ' "ranks": [{' + compact(data["ranks"][0]) + "}, ...]}"]
    return "```json\n" + "\n".join(lines) + "\n```"


@generated("docs/configs.md", "presets")
def presets_table() -> str:
    from effdist.train.presets import PRESET_DIR, list_presets, markdown_table

    return markdown_table(list_presets(PRESET_DIR), root=ROOT)


DRY_RUN_EXAMPLE = ["--config", "configs/tiny-cpu.yaml", "--set", "parallel.tp=2", "--set", "parallel.pp=2"]


@generated("docs/configs.md", "dry-run-example")
def dry_run_example() -> str:
    """The dry run of tiny-cpu on 4 CPU processes, against a fixed 16 GiB host so the text is reproducible."""
    from effdist.config import load_config
    from effdist.train.dry_run import plan
    from effdist.train.estimate import GIB, MemoryLimit

    with contextlib.chdir(ROOT):
        cfg = load_config(DRY_RUN_EXAMPLE[1], DRY_RUN_EXAMPLE[3::2])
        preset = load_config(DRY_RUN_EXAMPLE[1], check=False)
    text, error = plan(cfg, 4, DRY_RUN_EXAMPLE[1], preset, on_gpu=False,
                       limit=MemoryLimit(16 * GIB, "available host memory", 4))
    assert error is None, error
    command = "effdist train " + " ".join(DRY_RUN_EXAMPLE) + " --dry-run --world-size 4"
    return f"```\n$ {command}\n{text}\ndry run: the config is valid and fits; nothing was started\n```"


@generated("docs/configs.md", "config-ranges")
def config_ranges() -> str:
    """Every numeric config key with its valid values (effdist.config.NUMERIC_RANGES)."""
    from effdist.config import NUMERIC_RANGES, numeric_fields

    rows = ["| key | valid values | note |", "|---|---|---|"]
    for name, (kind, is_list) in numeric_fields().items():
        rule = NUMERIC_RANGES[name]
        valid = rule.describe(kind is int) + (", each element" if is_list else "")
        if rule.positive_sum:
            valid += ", not all zero"
        rows.append(f"| `{name}` | {valid} | {rule.hint} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Rewrite (or --check) the generated blocks of the docs.")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block differs from its generator")
    args = p.parse_args(argv)
    try:
        if args.check:
            stale = stale_blocks()
            for s in stale:
                print(f"stale: {s} (run python tools/render_docs.py)", file=sys.stderr)
            return 1 if stale else 0
        for path, (current, text) in render_all().items():
            if text != current:
                path.write_text(text)
                print(f"rewrote {path.relative_to(ROOT)}")
    except MarkerError as e:
        print(f"render_docs: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
