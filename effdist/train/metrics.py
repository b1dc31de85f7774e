"""What a run reports: RUN_DIR/metrics.jsonl, tensorboard scalars under RUN_DIR/tb/, a progress line.

metrics.jsonl holds one JSON object per logged step, written by global rank 0 only and flushed at
once, so another process (a plot, a test, a dashboard) can read it while the run goes on. Fields:
``step, loss, lr, grad_norm, tokens_per_s, tflops, mfu, peak_mem_gib, epas_region`` (always present,
null when not measured, e.g. ``mfu`` on CPU) followed by any extra keys the trainer passes, among them
``tflops_executed``, ``mfu_executed``, ``tokens_per_s_dense_equiv`` (executed rather than dense FLOPs:
effdist.train.flops; ``tflops``/``mfu`` keep counting the dense model) and ``step_time_s``.

Number format:
- Non-finite floats (NaN, +-inf) are written as JSON ``null``: strict JSON has no NaN, and every
  reader (jq, pandas, browsers) accepts null. A skipped step therefore shows ``"loss": null``.
- Quantities compared between runs (loss, lr, grad_norm and any key not listed below) keep full float
  precision, so a resumed or resharded run can be checked against a reference bit for bit.
- Measurements whose run-to-run noise is far above 1e-4 (timings, throughput, memory, MFU) are rounded
  to 4 significant digits, which keeps the file readable.

Resuming: ``MetricsLogger(..., resume_step=k)`` drops the entries with step > k (written after the
checkpoint the run resumes from) so the file continues exactly, without duplicates; tensorboard events
after step k are purged the same way.

Rolling back (resuming an older checkpoint, see run_dir.py) keeps the abandoned line instead: the trainer
appends ``{"event": "rollback", "step": k, "from_step": ..., "to": ..., "moved_to": ...}`` (an event
record: no loss fields) and records before the newest event are never dropped. `current_line(records)`
gives the step records of the current line only (what `effdist plot` draws).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from effdist.runtime import progress
from effdist.runtime.progress import console_line  # noqa: F401 (the trainer's log lines go through it)
from effdist.train.flops import attention_matmul_params, causal_attention_flops, ffn_matmul_params

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
CORE_FIELDS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu", "peak_mem_gib", "epas_region")
ROUNDED_FIELDS = frozenset({"tokens_per_s", "tflops", "mfu", "peak_mem_gib", "step_time_s", "tflops_executed",
                            "mfu_executed", "mfu_executed_fp8_peak", "tokens_per_s_dense_equiv"})
ROUND_DIGITS = 4


def _round_significant(x: float, digits: int = ROUND_DIGITS) -> float:
    if x == 0:
        return 0.0
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def _json_value(key: str, value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # 0-d tensors and numpy scalars
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return _round_significant(value) if key in ROUNDED_FIELDS else value
    if isinstance(value, Mapping):
        return {str(k): _json_value(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(key, v) for v in value]
    return str(value)


def format_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON object written for one step: core fields first (None when absent), then the rest."""
    if "step" not in record:
        raise ValueError(f"a metrics record needs a 'step' field; got keys {sorted(record)}")
    out = {k: _json_value(k, record.get(k)) for k in CORE_FIELDS}
    for k, v in record.items():
        if k not in out:
            out[k] = _json_value(k, v)
    return out


class MetricsFileError(ValueError):
    """RUN_DIR/metrics.jsonl has a line that is not a JSON object (not the torn last line of a killed writer)."""


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of RUN_DIR/metrics.jsonl, in file order. A torn last line (the writer was killed
    mid-write) is ignored; a malformed line elsewhere is an error naming the line."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise MetricsFileError(f"{path}:{i + 1}: not a JSON object ({e}); mend or remove that line (the "
                                   "records are one JSON object per line)") from None
    return records


def append_event(run_dir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append an event record (``{"event": "rollback", "step": k, ...}``: no loss fields, so step readers
    skip it) to RUN_DIR/metrics.jsonl, flushed to disk before the run goes on."""
    if "event" not in record or "step" not in record:
        raise ValueError(f"an event record needs 'event' and 'step'; got keys {sorted(record)}")
    path = Path(run_dir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({k: _json_value(k, v) for k, v in record.items()}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def current_line(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The step records of the run's current line of history: a rollback event to step k drops the
    records after step k written before it (they stay in the file, as the abandoned line)."""
    out: list[dict[str, Any]] = []
    for r in records:
        if "event" in r:
            if r.get("event") == "rollback" and isinstance(r.get("step"), int):
                out = [x for x in out if x["step"] <= r["step"]]
        elif isinstance(r.get("step"), int):
            out.append(r)
    return out


def model_flops_per_token(num_layers: int, hidden: int, ffn_hidden: int, num_heads: int, num_query_groups: int,
                          vocab: int, seq: int, gated: bool = True) -> float:
    """Training FLOPs (forward + backward) per token of a LLaMA-style decoder, the MFU numerator.

    = 6 x (matmul parameters of the transformer layers + LM head) + 6 x L x h x S.

    - Per layer: Q and O projections h x h each, K and V h x (h / heads x query_groups) each (GQA),
      FFN 3 x h x ffn (SwiGLU: gate, up, down) or 2 x h x ffn when not gated.
    - LM head: h x vocab. The input embedding is a lookup, not a matmul, so it is not counted; norms
      and biases are negligible.
    - 6 = 2 FLOPs per multiply-add x (1 forward + 2 backward).
    - Attention scores and the weighted sum cost 2 x 2 x S x h per token per layer forward for full
      attention; causal attention needs half, so with backward: 3 x 2 x S x h = 6 x h x S per layer
      (the convention of platform-notes.md; PaLM's 12 x L x h x S counts the masked half too).
    Recomputation (activation checkpointing) is not counted: this is model FLOPs, not hardware FLOPs.
    """
    for name, value in (("num_layers", num_layers), ("hidden", hidden), ("ffn_hidden", ffn_hidden),
                        ("num_heads", num_heads), ("num_query_groups", num_query_groups), ("vocab", vocab),
                        ("seq", seq)):
        if value < 1:
            raise ValueError(f"model_flops_per_token: {name}={value} must be positive")
    if hidden % num_heads or num_heads % num_query_groups:
        raise ValueError(f"model_flops_per_token: hidden={hidden}, num_heads={num_heads}, "
                         f"num_query_groups={num_query_groups} must divide evenly")
    per_layer = (attention_matmul_params(hidden, num_heads, num_query_groups)
                 + ffn_matmul_params(hidden, ffn_hidden, gated=gated))
    return 6.0 * (num_layers * per_layer + hidden * vocab) + num_layers * causal_attention_flops(hidden, seq)


# Dense bf16 tensor-core peaks from the vendor datasheets, TFLOP/s (no 2:4 sparsity). Matched against
# torch.cuda.get_device_name() by substring, most specific first.
_PEAK_BF16_TFLOPS = (
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIE", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H800", 989.0), ("H20", 148.0), ("B200", 2250.0), ("B100", 1750.0), ("GB200", 2500.0),
    ("A100", 312.0), ("A800", 312.0), ("A30", 165.0), ("A10G", 70.0), ("A10", 125.0), ("L40S", 362.0),
    ("L40", 181.0), ("L4", 121.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("MI300X", 1307.0),
    ("MI250X", 383.0),
)


# Dense FP8 tensor-core peaks (no 2:4 sparsity), TFLOP/s; GPUs without FP8 tensor cores are absent.
_PEAK_FP8_TFLOPS = (
    ("GH200", 1979.0), ("H200", 1979.0), ("H100 PCIE", 1513.0), ("H100 NVL", 1671.0), ("H100", 1979.0),
    ("H800", 1979.0), ("B200", 4500.0), ("B100", 3500.0), ("GB200", 5000.0), ("L40S", 733.0), ("L4", 242.0),
    ("MI300X", 2615.0),
)


def _peak_by_name(table, device_name: str) -> float | None:
    name = device_name.upper()
    for key, tflops in sorted(table, key=lambda kv: -len(kv[0])):
        if key in name:
            return tflops
    return None


def peak_bf16_tflops(device_name: str) -> float | None:
    """Datasheet dense bf16 peak of a GPU by name, or None if unknown (then MFU is not reported)."""
    return _peak_by_name(_PEAK_BF16_TFLOPS, device_name)


def peak_fp8_tflops(device_name: str) -> float | None:
    """Datasheet dense FP8 peak of a GPU by name, or None if unknown or without FP8 tensor cores."""
    return _peak_by_name(_PEAK_FP8_TFLOPS, device_name)


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class ProgressBar:
    """The console line of a run, on stderr: step/total, loss, lr, tokens/s, TFLOP/s, MFU, memory, ETA.

    TFLOP/s and MFU are the executed ones (``tflops_executed``, ``mfu_executed``) when the record has them;
    the dense-equivalent tokens/s is shown beside tokens/s where the two differ (EPAS, low-rank FFNs).

    On a terminal the line is a bar rewritten in place with ``\\r``; in a pipe or a log file (Slurm
    output) every update is a plain line of its own (the trainer updates once per logging.interval), or
    every `every` steps when given. The ETA uses the mean time per step since the first update, which
    leaves out the slow first step (compilation, warm-up). Other lines written through `console_line`
    while a bar is shown go above it instead of being glued to it.
    """

    def __init__(self, total_steps: int, stream: TextIO | None = None, every: int | None = None,
                 clock=time.monotonic):
        self.total = max(1, int(total_steps))
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = progress.is_terminal(self.stream)
        self.every = every or 1
        self.clock = clock
        self._first: tuple[int, float] | None = None
        self._last_printed: int | None = None
        self._shown = ""  # the bar currently on the terminal line ("" when none)

    def eta_s(self, step: int) -> float | None:
        now = self.clock()
        if self._first is None or step <= self._first[0]:
            return None
        per_step = (now - self._first[1]) / (step - self._first[0])
        return per_step * max(0, self.total - step)

    def line(self, step: int, record: Mapping[str, Any]) -> str:
        percent = f"{100 * step / self.total:3.0f}%"
        if self.interactive:
            width = 20
            filled = min(width, int(width * step / self.total))
            percent = f"[{'#' * filled}{'.' * (width - filled)}] {percent}"
        parts = [f"step {step}/{self.total} {percent}"]

        def number(key: str) -> float | None:
            value = record.get(key)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            return value if ok else None

        if (loss := number("loss")) is not None:
            parts.append(f"loss {loss:.4f}")
        elif "loss" in record:
            parts.append("loss nan (update skipped)")
        if (lr := number("lr")) is not None:
            parts.append(f"lr {lr:.2e}")
        if (tps := number("tokens_per_s")) is not None:
            parts.append(f"{tps:,.0f} tok/s")
            dense_equiv = number("tokens_per_s_dense_equiv")
            if dense_equiv is not None and abs(dense_equiv - tps) > 5e-4 * tps:
                parts.append(f"(dense-equiv {dense_equiv:,.0f})")
        # FLOPs the GPUs executed where the trainer reports them; the dense count only as a fallback.
        executed = "tflops_executed" in record
        if (tflops := number("tflops_executed" if executed else "tflops")) is not None:
            parts.append(f"{tflops:.3g} TFLOP/s")
        if (mfu := number("mfu_executed" if executed else "mfu")) is not None:
            parts.append(f"MFU {100 * mfu:.1f}%")
        if (mem := number("peak_mem_gib")) is not None:
            parts.append(f"peak mem {mem:.2f} GiB")
        eta = self.eta_s(step)
        parts.append(f"eta {_format_duration(eta)}" if eta is not None else "eta ?")
        return "  ".join(parts)

    def update(self, step: int, record: Mapping[str, Any]) -> None:
        if self._first is None:
            self._first = (step, self.clock())
        if self.interactive:
            self._shown = self.line(step, record)
            self.stream.write("\r\x1b[K" + self._shown)
            progress.set_active(self)
        elif self._last_printed is None or step - self._last_printed >= self.every or step >= self.total:
            # By distance, not `step % every`: the trainer may log every k steps with k not dividing `every`.
            self.stream.write(self.line(step, record) + "\n")
            self._last_printed = step
        self.stream.flush()

    def write_above(self, text: str) -> None:
        """Print `text` as a line of its own; on a terminal the bar is drawn again below it."""
        progress.write_above(self.stream, self._shown, text)

    def close(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = ""
        if progress.active() is self:
            progress.set_active(None)


class MetricsLogger:
    """Rank 0 writes; on other ranks (enabled=False) every method is a no-op, so callers need no `if`."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True,
                 total_steps: int = 0, progress_bar: bool = True, resume_step: int = 0,
                 progress_stream: TextIO | None = None, progress_every: int | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / METRICS_FILE
        self._file: TextIO | None = None
        self._tb = None
        self.progress: ProgressBar | None = None
        if not enabled:
            return
        if resume_step < 0:
            raise ValueError(f"resume_step={resume_step} must be >= 0")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            self._tb = _open_tensorboard(self.run_dir / TB_DIR, purge_step=resume_step + 1)
        if progress_bar:
            self.progress = ProgressBar(total_steps, stream=progress_stream, every=progress_every)

    def _truncate_after(self, resume_step: int) -> None:
        """Keep the records of steps 1..resume_step written since the newest event record, and every record
        up to that event (an abandoned line of history stays in the file); rewrite atomically so a crash
        here loses nothing."""
        if not self.path.exists():
            return
        records = read_metrics(self.run_dir)
        last_event = max((i for i, r in enumerate(records) if "event" in r), default=-1)
        kept = records[:last_event + 1] + [r for r in records[last_event + 1:]
                                           if isinstance(r.get("step"), int) and r["step"] <= resume_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def log(self, record: Mapping[str, Any]) -> dict[str, Any] | None:
        """Append one step's record (must contain 'step'); returns what was written."""
        if not self.enabled or self._file is None:
            return None
        self.check_still_there(record.get("step"))
        row = format_record(record)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            try:
                for key, value in row.items():
                    if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                        self._tb.add_scalar(f"train/{key}", value, global_step=row["step"])
                self._tb.flush()
            except Exception as e:  # noqa: BLE001 - tensorboard re-raises its writer thread's error, of any type
                self._tensorboard_failed(e)
        if self.progress is not None:
            self.progress.update(row["step"], row)
        return row

    def check_still_there(self, step: Any) -> None:
        """The file this logger appends to must still be RUN_DIR/metrics.jsonl. A run directory deleted (or moved,
        or its metrics.jsonl removed) while the run trains left the records going into a file nobody can open, and
        the next save made a new directory of checkpoints without them, or the lock, silently: stop instead."""
        if not self.enabled or self._file is None:
            return
        held = os.fstat(self._file.fileno())
        try:
            there = os.stat(self.path)
            same = held.st_nlink > 0 and (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino)
        except OSError:
            same = False
        if not same:
            raise MetricsFileError(
                f"{self.path} was deleted or replaced while this run trained (run directory removed, moved or "
                f"cleaned?): stopped at step {step} without saving; start again, or restore the directory and "
                "--resume auto")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            try:
                self._tb.close()
            except Exception:  # noqa: BLE001 - said when it first failed; closing must not fail the run's end
                pass
            self._tb = None

    def _tensorboard_failed(self, error: Exception) -> None:
        """tensorboard/ is auxiliary: a write that fails (a read-only or vanished directory, a full disk) turns it
        off with one line; training and metrics.jsonl go on (a save into the same place fails on its own terms)."""
        tb, self._tb = self._tb, None
        try:
            tb.close()
        except Exception:  # noqa: BLE001
            pass
        line = (f"[effdist] WARNING: tensorboard logging off: cannot write {self.run_dir / TB_DIR} "
                f"({type(error).__name__}: {error}); metrics.jsonl is still written")
        if self.progress is not None:
            self.progress.write_above(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_tensorboard(log_dir: Path, purge_step: int):
    """A SummaryWriter, or None with one warning when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # tensorboard is optional at run time: metrics.jsonl has everything
        print(f"[effdist] tensorboard logging off ({e}); metrics.jsonl is still written", file=sys.stderr)
        return None
    _quiet_tensorboard_writer_thread()
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def _quiet_tensorboard_writer_thread() -> None:
    """tensorboard's writer thread dies with its error printed as a thread traceback, then re-raises it on the
    next write, where MetricsLogger says it in one line: leave the thread's copy unprinted."""
    import threading

    previous = threading.excepthook
    if getattr(previous, "_effdist_tensorboard", False):
        return

    def hook(args):
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, Exception):
            return
        previous(args)

    hook._effdist_tensorboard = True
    threading.excepthook = hook
