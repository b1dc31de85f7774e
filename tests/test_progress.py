"""Progress of long tasks (effdist.runtime.progress): a bar on a terminal, nothing or plain count lines in a
pipe, EFFDIST_PROGRESS to force either; tokenizer training, preprocessing, conversion and checkpoint
loading report through it."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

from effdist.runtime import progress
from effdist.runtime.progress import Progress, console_line
from launching import ROOT, clean_env


class Tty(io.StringIO):
    def isatty(self):
        return True


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture(autouse=True)
def no_forced_mode(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)


def test_a_terminal_gets_a_bar_redrawn_in_place_and_lines_go_above_it():
    out, clock = Tty(), Clock()
    with Progress("converting", total=4, unit="layers", stream=out, clock=clock) as bar:
        for _ in range(4):
            clock.now += 1.0
            bar.update()
            if bar.done == 2:
                console_line("[effdist] a note", stream=out)
    text = out.getvalue()
    assert "\r\x1b[Kconverting: [##########..........]  50% 2/4 layers 2s" in text
    assert "\r\x1b[K[effdist] a note\nconverting: [##########" in text  # above the bar, which is drawn again
    assert text.endswith("\r\x1b[Kconverting: [####################] 100% 4/4 layers 4s\n")
    assert progress.active() is None


def test_a_pipe_gets_no_bar_and_a_count_line_only_while_a_task_runs_long():
    out, clock = io.StringIO(), Clock()
    with Progress("tokenizing", total=1000, unit="docs", stream=out, clock=clock, line_every_s=30) as bar:
        bar.update(100)
        clock.now = 10
        bar.update(100)
    assert out.getvalue() == ""  # a short task stays silent in a log
    out, clock = io.StringIO(), Clock()
    with Progress("tokenizing", total=1000, unit="docs", stream=out, clock=clock, line_every_s=30) as bar:
        for _ in range(10):
            clock.now += 10
            bar.update(100)
    assert out.getvalue() == ("tokenizing: 30% 300/1,000 docs 30s\n"
                              "tokenizing: 60% 600/1,000 docs 1m00s\n"
                              "tokenizing: 90% 900/1,000 docs 1m30s\n"
                              "tokenizing: 100% 1,000/1,000 docs 1m40s (done)\n")


def test_bytes_and_stages_without_a_count():
    out = Tty()
    with Progress("verifying iter_0000010", total=3 * 2**30, unit="B", stream=out, clock=Clock()) as bar:
        bar.update(2**30)
    assert "verifying iter_0000010: [######..............]  33% 1.0 GiB/3.0 GiB 0s" in out.getvalue()
    out = Tty()
    with Progress("loading iter_0000010", stream=out, clock=Clock()) as bar:
        bar.stage("reading model weights")
    assert out.getvalue().endswith("loading iter_0000010: reading model weights 0s\n")


def test_a_last_error_line_does_not_glue_onto_the_step_bar():
    """A run that stops (Ctrl-C, a named error) while its step bar is on the terminal: end_bar ends the bar's line,
    keeping its last state, before the error is written."""
    from effdist.train.metrics import ProgressBar

    out = Tty()
    bar = ProgressBar(10, stream=out)
    bar.update(3, {"loss": 2.5})
    assert progress.active() is bar
    progress.end_bar()
    out.write("effdist: error (rank 0): interrupted\n")
    assert out.getvalue().endswith("loss 2.5000  eta ?\neffdist: error (rank 0): interrupted\n"), out.getvalue()
    assert progress.active() is None
    progress.end_bar()  # nothing shown: nothing written
    assert out.getvalue().endswith("interrupted\n")


def test_effdist_progress_forces_the_mode(monkeypatch):
    from effdist.train.metrics import ProgressBar

    monkeypatch.setenv(progress.ENV, "bar")
    out = io.StringIO()
    with Progress("x", total=2, stream=out, clock=Clock()) as bar:
        bar.update(2)
    assert "\r\x1b[Kx: [####################] 100% 2/2 0s\n" in out.getvalue()
    assert ProgressBar(10, stream=io.StringIO()).interactive
    monkeypatch.setenv(progress.ENV, "lines")
    out = Tty()
    with Progress("x", total=2, stream=out, clock=Clock()) as bar:
        bar.update(2)
    assert out.getvalue() == "" and not ProgressBar(10, stream=Tty()).interactive
    monkeypatch.setenv(progress.ENV, "off")
    out = Tty()
    with Progress("x", total=2, stream=out, clock=Clock(), line_every_s=0) as bar:
        bar.update(2)
    assert out.getvalue() == ""
    monkeypatch.delenv(progress.ENV)
    out = Tty()
    with Progress("x", total=2, stream=out, enabled=False) as bar:  # e.g. ranks other than 0
        bar.update(2)
    assert out.getvalue() == ""


def test_conversion_and_checkpoint_verification_show_bars(monkeypatch, capsys, tmp_path):
    from effdist.config import Config
    from effdist.model.hf_convert import effdist_to_hf, hf_shapes, hf_to_effdist
    from effdist.train import checkpoint as ckpt

    monkeypatch.setenv(progress.ENV, "bar")
    cfg = Config()
    cfg.model.vocab_size = 128
    hf_sd = {k: torch.randn(shape) for k, shape in hf_shapes(cfg).items()}
    effdist_to_hf(hf_to_effdist(hf_sd, cfg), cfg)
    err = capsys.readouterr().err
    assert "converting HF -> effdist: [####################] 100% 4/4 layers" in err
    assert "converting effdist -> HF: [####################] 100% 4/4 layers" in err
    # A checkpoint's files are read for their CRC with a bar in bytes.
    tmp = tmp_path / "iter_0000001.tmp"
    tmp.mkdir()
    (tmp / "weights.bin").write_bytes(b"x" * 5000)
    ckpt.make_visible(tmp_path, tmp, tmp_path / "iter_0000001", 1, {})
    ckpt.verify(tmp_path / "iter_0000001", progress=True)
    assert "verifying iter_0000001: [####################] 100% 4.9 KiB/4.9 KiB" in capsys.readouterr().err
    monkeypatch.delenv(progress.ENV)
    ckpt.verify(tmp_path / "iter_0000001", progress=True)  # pytest's capture is no terminal: silent
    assert capsys.readouterr().err == ""


def _run(args, **env):
    """Run an effdist command with stdout and stderr piped; the output is decoded as written (\r kept)."""
    proc = subprocess.run([sys.executable, "-m", "effdist.cli", *map(str, args)], env=clean_env(**env), cwd=ROOT,
                          capture_output=True, timeout=300)
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    return proc


@pytest.mark.slow
def test_tokenizer_training_and_preprocessing_in_a_pipe_and_on_a_forced_terminal(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " + "the quick brown fox " * (i % 5 + 1)}) + "\n"
                              for i in range(300)))
    tok = tmp_path / "tok.json"
    steps = [("tokenizer", "train", "--input", corpus, "--vocab-size", 300, "--output", tok),
             ("preprocess", "--input", corpus, "--tokenizer", tok, "--output-prefix", tmp_path / "c")]
    for args in steps:  # a pipe (a log file): no bar, no \r, no blank lines from third-party bars
        proc = _run(args)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "\r" not in proc.stderr and proc.stderr.strip() == "", proc.stderr[-2000:]
        assert proc.stdout.startswith("wrote ") and len(proc.stdout.splitlines()) == 1, proc.stdout
    bars = ""
    for args in steps:  # the same outputs again: replacing them needs --overwrite
        proc = _run(args + ("--overwrite",), EFFDIST_PROGRESS="bar")
        assert proc.returncode == 0, proc.stderr[-2000:]
        bars += proc.stderr
    for bar in ("training tokenizer: [####################] 100% 300/300 docs",
                "tokenizing: [####################] 100% 300/300 docs",
                "writing .bin/.idx: [####################] 100% 300/300 docs"):
        assert "\r\x1b[K" + bar in bars, bars[-2000:]
