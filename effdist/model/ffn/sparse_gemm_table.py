"""Where ELAS's fc2 forward runs as a 2:4 sparse GEMM (cuSPARSELt): read from a table measured per GPU and shape,
never timed at run time (issue #23 item 3). A table gives the same answer on every rank, in every run and from
the first step; a timer at run time gave answers that depended on what else the GPU was doing.

A table is a JSON file in configs/kernel_tables/ (``sparse24-*.json``)::

    {"format": "effdist-sparse24-fc2/1", "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130",
     "date": "2026-12-05", "command": "python tools/bench_ffn.py ...", "source": "...",
     "entries": [{"tokens": 16384, "in_features": 4224, "out_features": 1024, "dtype": "bf16",
                  "dense_ms": 1.65, "sparse_ms": 4.33, "measured": "gemm"}, ...]}

`measured` says what the two times are: ``gemm`` (the fc2 forward GEMM alone: ``y @ W.T`` against
compress + ``torch._cslt_sparse_mm``, written by ``tools/bench_ffn.py --sparse24-table``) or ``ffn_block``
(forward + backward of the whole ELAS block with the dense and with the forced sparse fc2, converted from a block
benchmark's JSON by ``--sparse24-from-blocks``). Either way the choice compares the two times of one entry.

The choice for a GEMM of `tokens` rows with weight [out_features, in_features] in `dtype` on a GPU named `device`:
the entries of the tables for that GPU (the same name as ``torch.cuda.get_device_name``) with the same
(in_features, out_features, dtype); of those, the one nearest in token count (on a log scale); the sparse GEMM if
that entry measured it faster. Anything else -- another GPU, a shape or dtype never measured -- runs dense.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from effdist.config import ConfigError

TABLE_DIR = Path(__file__).resolve().parents[3] / "configs" / "kernel_tables"  # shipped tables
TABLE_GLOB = "sparse24-*.json"
FORMAT = "effdist-sparse24-fc2/1"
MEASURED = ("gemm", "ffn_block")
MEASURE_HINT = ("measure it on this GPU with `python tools/bench_ffn.py --sparse24-table "
                "configs/kernel_tables/sparse24-<gpu>.json`")


class TableError(ConfigError):
    """A table file that cannot be read or does not follow FORMAT (a ConfigError: the trainer prints it as one
    line naming the file and the field)."""


@dataclass(frozen=True)
class Entry:
    tokens: int
    in_features: int
    out_features: int
    dtype: str  # "bf16" | "fp16"
    dense_ms: float
    sparse_ms: float
    measured: str = "gemm"

    @property
    def sparse_pays(self) -> bool:
        return self.sparse_ms < self.dense_ms


@dataclass(frozen=True)
class Table:
    device: str
    entries: tuple[Entry, ...]
    path: Optional[Path] = None
    meta: tuple[tuple[str, str], ...] = ()  # torch, date, command, source

    def to_dict(self) -> dict:
        return {"format": FORMAT, "device": self.device, **dict(self.meta),
                "entries": [asdict(e) for e in self.entries]}


@dataclass(frozen=True)
class Choice:
    sparse: bool
    why: str
    entry: Optional[Entry] = None


def parse_table(data: dict, path: Optional[Path] = None) -> Table:
    where = str(path) if path else "the table"
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TableError(f"{where}: format = {data.get('format') if isinstance(data, dict) else None!r}; "
                         f"expected {FORMAT!r}")
    device = data.get("device")
    if not isinstance(device, str) or not device:
        raise TableError(f"{where}: device = {device!r}; expected the GPU's name (torch.cuda.get_device_name)")
    entries = []
    for i, raw in enumerate(data.get("entries") or []):
        try:
            entry = Entry(tokens=int(raw["tokens"]), in_features=int(raw["in_features"]),
                          out_features=int(raw["out_features"]), dtype=str(raw["dtype"]),
                          dense_ms=float(raw["dense_ms"]), sparse_ms=float(raw["sparse_ms"]),
                          measured=str(raw.get("measured", "gemm")))
        except (KeyError, TypeError, ValueError) as e:
            raise TableError(f"{where}: entries[{i}] = {raw!r}: {type(e).__name__}: {e}") from None
        if entry.measured not in MEASURED or entry.tokens <= 0 or entry.dense_ms <= 0 or entry.sparse_ms <= 0:
            raise TableError(f"{where}: entries[{i}] = {raw!r}: needs tokens > 0, dense_ms > 0, sparse_ms > 0 and "
                             f"measured in {MEASURED}")
        entries.append(entry)
    if not entries:
        raise TableError(f"{where}: no entries")
    meta = tuple((k, str(data[k])) for k in ("torch", "date", "command", "source") if k in data)
    return Table(device, tuple(entries), path, meta)


def load_table(path: Path) -> Table:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise TableError(f"{path}: {e}") from None
    return parse_table(data, Path(path))


@functools.lru_cache(maxsize=None)
def shipped_tables(directory: Path = TABLE_DIR) -> tuple[Table, ...]:
    """Every table in `directory` (read once per process)."""
    return tuple(load_table(p) for p in sorted(Path(directory).glob(TABLE_GLOB)))


def choose(device: str, tokens: int, in_features: int, out_features: int, dtype: str,
           tables: Optional[Sequence[Table]] = None) -> Choice:
    """Sparse or dense for one fc2 forward GEMM; see the module docstring."""
    tables = shipped_tables() if tables is None else tables
    shape = f"weight [{out_features}, {in_features}] {dtype}"
    candidates = [e for t in tables if t.device == device for e in t.entries
                  if (e.in_features, e.out_features, e.dtype) == (in_features, out_features, dtype)]
    if not candidates:
        known = sorted({t.device for t in tables})
        what = (f"no measured entry for {shape} on {device}" if device in known
                else f"no table for {device} (tables for: {', '.join(known) or 'none'})")
        return Choice(False, f"{what}: dense GEMM; {MEASURE_HINT}")
    entry = min(candidates, key=lambda e: (abs(math.log(e.tokens / tokens)), e.tokens))
    verdict = "sparse" if entry.sparse_pays else "dense"
    return Choice(entry.sparse_pays, f"{verdict} GEMM: at {entry.tokens} tokens the table measured {shape} "
                                     f"{entry.sparse_ms:.3g} ms sparse against {entry.dense_ms:.3g} ms dense "
                                     f"({entry.measured})", entry)


def table_from_block_rows(rows: Iterable[dict], device: str, dtype: str, shapes: dict[str, tuple[int, int]],
                          meta: dict[str, str]) -> Table:
    """A table from a block benchmark's rows (tools/bench_ffn.py --json): for each (shape, tokens), the ELAS block
    with fc2 dense (`elas`, `elas-masked`) against the same block with cuSPARSELt forced (`-cslt`). `shapes` maps
    a shape name to fc2's (in_features, out_features). Both STE modes measure the same GEMM; the slower sparse
    pairing is kept (the choice must hold for both)."""
    by_key = {(r["shape"], r["tokens"], r["variant"]): r for r in rows if "ms" in r and "error" not in r}
    entries: dict[tuple, Entry] = {}
    for (shape, tokens, variant), row in sorted(by_key.items()):
        sparse = by_key.get((shape, tokens, f"{variant}-cslt"))
        if variant not in ("elas", "elas-masked") or sparse is None or shape not in shapes:
            continue
        in_features, out_features = shapes[shape]
        entry = Entry(tokens, in_features, out_features, dtype, row["ms"], sparse["ms"], "ffn_block")
        key = (tokens, in_features, out_features)
        old = entries.get(key)
        if old is None or entry.sparse_ms / entry.dense_ms > old.sparse_ms / old.dense_ms:
            entries[key] = entry
    if not entries:
        raise TableError("the block results hold no pair of an ELAS block and its -cslt twin at the same shape")
    return Table(device, tuple(entries[k] for k in sorted(entries)), None, tuple(meta.items()))
