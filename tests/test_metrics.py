"""metrics.jsonl format and resume truncation, tensorboard scalars (and their purge on resume), the progress
line, model FLOPs per token, GPU peaks, and `effdist plot`."""

from __future__ import annotations

import io
import json
import math
import sys

import pytest

from effdist.train import plot
from effdist.train.metrics import (
    CORE_FIELDS,
    MetricsLogger,
    ProgressBar,
    format_record,
    model_flops_per_token,
    peak_bf16_tflops,
    read_metrics,
)


def _record(step: int, loss: float, **extra) -> dict:
    return dict(step=step, loss=loss, lr=1e-3 * step, grad_norm=0.5, tokens_per_s=123456.789, tflops=12.3456789,
                mfu=None, peak_mem_gib=1.23456, epas_region=0, **extra)


def _logger(run_dir, **kw) -> MetricsLogger:
    kw.setdefault("tensorboard", False)
    kw.setdefault("progress_bar", False)
    return MetricsLogger(run_dir, enabled=True, total_steps=10, **kw)


def test_record_format_nan_as_null_rounding_and_extras(tmp_path):
    with _logger(tmp_path) as m:
        m.log(_record(1, 2.718281828459045, skipped_steps=0, stage_bytes=[1.5, float("inf")]))
        m.log(dict(step=2, loss=float("nan"), grad_norm=float("inf"), lr=0.001))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert list(first)[: len(CORE_FIELDS)] == list(CORE_FIELDS)
    assert first["loss"] == 2.718281828459045  # compared across runs: full precision
    assert first["tokens_per_s"] == 123500.0 and first["tflops"] == 12.35 and first["peak_mem_gib"] == 1.235
    assert first["mfu"] is None and first["skipped_steps"] == 0 and first["stage_bytes"] == [1.5, None]
    # Strict JSON: no NaN/Infinity tokens anywhere.
    assert "NaN" not in lines[1] and "Infinity" not in lines[1]
    assert second["loss"] is None and second["grad_norm"] is None and second["tokens_per_s"] is None
    assert read_metrics(tmp_path) == [first, second]


def test_record_needs_a_step():
    with pytest.raises(ValueError, match="step"):
        format_record({"loss": 1.0})


def test_disabled_logger_writes_nothing(tmp_path):
    m = MetricsLogger(tmp_path / "run", enabled=False, tensorboard=True, total_steps=5, progress_bar=True)
    assert m.log(_record(1, 1.0)) is None
    m.close()
    assert not (tmp_path / "run").exists()


def test_resume_truncates_later_steps_and_continues_without_duplicates(tmp_path):
    with _logger(tmp_path) as m:
        for s in range(1, 7):
            m.log(_record(s, float(s)))
    # A resume from the step-3 checkpoint: steps 4..6 will be trained again.
    with _logger(tmp_path, resume_step=3) as m:
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
        for s in range(4, 6):
            m.log(_record(s, 100.0 + s))
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in records] == [1.0, 2.0, 3.0, 104.0, 105.0]


def test_resume_drops_a_torn_last_line_and_fresh_start_empties_the_file(tmp_path):
    with _logger(tmp_path) as m:
        for s in range(1, 4):
            m.log(_record(s, float(s)))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss"')  # the writer was killed mid-line
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    with _logger(tmp_path, resume_step=3) as m:
        m.log(_record(4, 4.0))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    _logger(tmp_path, resume_step=0).close()
    assert read_metrics(tmp_path) == []


def test_read_metrics_reports_a_corrupt_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(tmp_path)
    assert read_metrics(tmp_path / "nowhere") == []


def test_a_tensorboard_that_cannot_write_is_turned_off_in_one_line(tmp_path, capsys):
    """A run directory made read-only mid-run: tensorboard's writer thread died with a traceback, the next
    write raised it again and ended the run. Now one line, and metrics.jsonl goes on."""
    import time

    with _logger(tmp_path, tensorboard=True) as m:
        m.log(_record(1, 1.0))

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        m._tb.file_writer.event_writer._general_file_writer.write = refuse
        for s in range(2, 6):
            m.log(_record(s, float(s)))
            time.sleep(0.05)  # the writer thread fails in the background; a later write sees it
    err = capsys.readouterr().err
    assert err.count("WARNING: tensorboard logging off: cannot write") == 1, err
    assert "Traceback" not in err and "Exception in thread" not in err, err
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]


def test_tensorboard_scalars_and_purge_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with _logger(tmp_path, tensorboard=True) as m:
        for s in range(1, 7):
            m.log(_record(s, float(s)))
    with _logger(tmp_path, tensorboard=True, resume_step=3) as m:
        for s in range(4, 6):
            m.log(_record(s, 100.0 + s))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5]
    assert [e.value for e in loss] == pytest.approx([1, 2, 3, 104, 105])
    assert "train/mfu" not in acc.Tags()["scalars"]  # None is not a scalar


def test_missing_tensorboard_is_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with _logger(tmp_path, tensorboard=True) as m:
        m.log(_record(1, 1.0))
    assert "tensorboard logging off" in capsys.readouterr().err
    assert read_metrics(tmp_path)[0]["loss"] == 1.0 and not (tmp_path / "tb").exists()


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_lines_in_a_log_file_with_eta():
    out, clock = io.StringIO(), _Clock()
    bar = ProgressBar(total_steps=100, stream=out, every=25, clock=clock)
    for step in range(1, 101):
        bar.update(step, {"loss": 3.0, "lr": 1e-3, "tokens_per_s": 1000.0, "tflops": 5.0})
        clock.now += 2.0  # 2 s per step
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["1/100", "26/100", "51/100", "76/100", "100/100"]
    assert "\r" not in out.getvalue()
    # After step 51: 50 steps in 100 s measured, 49 steps left -> 98 s.
    assert "eta 0:01:38" in lines[2] and "loss 3.0000" in lines[2] and "1,000 tok/s" in lines[2]
    assert "eta ?" in lines[0]


def test_progress_line_rewritten_in_place_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    bar = ProgressBar(total_steps=3, stream=out)
    for step in (1, 2, 3):
        bar.update(step, {"loss": 1.0})
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1


def test_logger_drives_the_progress_bar(tmp_path):
    out = io.StringIO()
    with _logger(tmp_path, progress_bar=True, progress_stream=out, progress_every=1) as m:
        m.log(_record(1, 2.5))
    assert "step 1/10" in out.getvalue() and "loss 2.5000" in out.getvalue()


def test_model_flops_per_token_by_hand():
    # L=2, h=8, ffn=16, 2 heads, 1 KV group (kv width 4), vocab 10, seq 4.
    # per layer: q,o 2*64 + k,v 2*8*4 = 192; SwiGLU 3*8*16 = 384 -> 576; x2 + head 80 = 1232
    assert model_flops_per_token(2, 8, 16, 2, 1, 10, 4, gated=True) == 6 * 1232 + 6 * 2 * 8 * 4
    # not gated: 2*8*16 = 256 -> 448 per layer; x2 + 80 = 976
    assert model_flops_per_token(2, 8, 16, 2, 1, 10, 4, gated=False) == 6 * 976 + 6 * 2 * 8 * 4
    with pytest.raises(ValueError, match="num_heads"):
        model_flops_per_token(2, 8, 16, 3, 1, 10, 4)
    with pytest.raises(ValueError, match="seq=0"):
        model_flops_per_token(2, 8, 16, 2, 1, 10, 0)


@pytest.mark.parametrize("layers, hidden, ffn, tokens_per_s, tflops", [
    (12, 768, 2048, 231e3, 178), (24, 1024, 2816, 91e3, 215), (16, 2048, 5632, 55e3, 315)])
def test_model_flops_match_the_platform_notes_convention(layers, hidden, ffn, tokens_per_s, tflops):
    # platform-notes.md measured LLaMA-125M/350M/1B (MHA, vocab 32000, seq 2048) with this convention.
    heads = hidden // 64
    per_token = model_flops_per_token(layers, hidden, ffn, heads, heads, 32000, 2048)
    assert per_token * tokens_per_s / 1e12 == pytest.approx(tflops, rel=0.01)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0), ("NVIDIA H20", 148.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A10G", 70.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0),
    ("Some Future GPU", None)])
def test_peak_bf16_tflops(name, peak):
    assert peak_bf16_tflops(name) == peak


# ------------------------------------------------------------------------------------------ effdist plot
def _write_run(run_dir, losses):
    with _logger(run_dir) as m:
        for step, loss in enumerate(losses, start=1):
            m.log(_record(step, loss))


def test_plot_writes_a_png_with_several_runs(tmp_path):
    import matplotlib.image

    a, b = tmp_path / "baseline", tmp_path / "epas"
    _write_run(a, [4.0, 3.5, 3.1, 2.9])
    _write_run(b, [4.1, float("nan"), 3.0, 2.7])
    out = tmp_path / "plots" / "loss.png"
    assert plot.main([str(a), str(b), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    steps, values = plot.series(b, "loss")
    assert steps == [1, 2, 3, 4] and math.isnan(values[1])
    assert plot.main([str(a), "--out", str(tmp_path / "gn.png"), "--key", "grad_norm", "--log-y"]) == 0


def test_plot_labels_and_errors(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert plot.run_labels([tmp_path / "x" / "run", tmp_path / "y" / "run", tmp_path / "z"]) == [
        str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run"), "z"]
    _write_run(tmp_path / "r", [1.0])
    assert plot.main([str(tmp_path / "r"), "--key", "nope", "--out", str(tmp_path / "o.png")]) == 2
    assert plot.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "no metrics.jsonl" in err
    _write_run(tmp_path / "diverged", [float("nan"), float("inf")])  # written as null: nothing to draw
    assert plot.main([str(tmp_path / "diverged"), "--out", str(tmp_path / "o.png")]) == 2
    assert "every 'loss' of its 2 records is null (non-finite)" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_plot_replaces_an_earlier_chart_but_no_other_file(tmp_path, capsys):
    """--out naming a run's own metrics.jsonl (or any file that is not a chart) is refused and left as it was;
    an earlier PNG is replaced; a directory is named."""
    run = tmp_path / "r"
    _write_run(run, [2.0, 1.5])
    metrics = (run / "metrics.jsonl").read_bytes()
    assert plot.main([str(run), "--out", str(run / "metrics.jsonl")]) == 2
    assert "exists and is not a PNG" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert plot.main([str(run), "--out", str(run)]) == 2
    assert f"--out {run} is a directory" in capsys.readouterr().err
    out = tmp_path / "loss.png"
    assert plot.main([str(run), "--out", str(out)]) == 0
    assert plot.main([str(run), "--out", str(out), "--key", "grad_norm"]) == 0


@pytest.mark.slow
def test_every_evaluation_is_written_whatever_the_logging_interval(tmp_path):
    """train.eval_interval=3 with logging.interval=2: the validation loss of step 3 is in metrics.jsonl, not
    computed and dropped because step 3 is not a logging step."""
    from tests.launching import losses, run_train

    run_train(tmp_path / "run", ["train.steps=4", "train.global_batch=8", "train.micro_batch=2", "data.seq_length=64",
                                 "train.eval_interval=3", "train.eval_steps=1", "logging.interval=2",
                                 "logging.tensorboard=false", "checkpoint.save_at_end=false",
                                 f"data.cache_dir={tmp_path / 'data'}"])
    assert sorted(losses(tmp_path / "run", "val_loss")) == [3, 4]
    assert sorted(losses(tmp_path / "run")) == [2, 3, 4]


def test_a_log_file_gets_one_plain_line_per_update_with_mfu_and_memory():
    from effdist.train.metrics import console_line

    out = io.StringIO()
    bar = ProgressBar(total_steps=10, stream=out)
    for step in (2, 4, 6):
        bar.update(step, {"loss": 2.0, "lr": 1e-3, "tokens_per_s": 10.0, "tflops": 1.0, "mfu": 0.412,
                          "peak_mem_gib": 1.5})
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "[" not in lines[0] and "\r" not in out.getvalue()
    assert "MFU 41.2%" in lines[1] and "peak mem 1.50 GiB" in lines[1]
    console_line("[effdist] note", stream=out)
    assert out.getvalue().endswith("6/10  60%  loss 2.0000  lr 1.00e-03  10 tok/s  1 TFLOP/s  MFU 41.2%  "
                                   "peak mem 1.50 GiB  eta 0:00:00\n[effdist] note\n")


def test_a_line_written_during_a_terminal_bar_goes_above_it():
    from effdist.train.metrics import console_line

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    bar = ProgressBar(total_steps=3, stream=out)
    bar.update(1, {"loss": 1.0})
    console_line("[effdist] EPAS: from step 2 layer 3 shares Q/K: region 1 of 2", stream=out)
    bar.close()
    text = out.getvalue()
    assert "\r\x1b[K[effdist] EPAS: from step 2 layer 3 shares Q/K: region 1 of 2\nstep 1/3 [" in text
