"""A bad flag of any `effdist` command is one line naming it (and the option meant, for a misspelled one), exit 2,
not argparse's usage block above the error (effdist/runtime/cli_parser.py)."""

from __future__ import annotations

import pytest

from effdist.data import tokenizer
from effdist.pipeline import simulate_cli
from effdist.train import planner


def _error(main, argv: list[str], capsys) -> str:
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    return err.strip()


def test_a_misspelled_flag_is_one_line_naming_the_option_meant(capsys):
    err = _error(planner.main, ["--config", "llama-1b", "--gpus", "8", "--gpu-memory", "80", "--top-k", "3"], capsys)
    assert err == ("effdist plan: error: unrecognized arguments: --top-k (did you mean --top?) 3; "
                   "see effdist plan --help")
    # a misspelled required option: argparse names only the required one as missing
    err = _error(planner.main, ["--config", "llama-1b", "--gpus", "8", "--gpu-memroy", "80"], capsys)
    assert err == ("effdist plan: error: the following arguments are required: --gpu-memory; unrecognized: "
                   "--gpu-memroy (did you mean --gpu-memory?); see effdist plan --help")


def test_a_wrong_value_and_a_wrong_sub_command_are_one_line(capsys):
    err = _error(simulate_cli.main, ["--schedule", "v-half", "--pp", "four"], capsys)
    assert err.startswith("effdist simulate: error: argument --pp: invalid int value: 'four'")
    err = _error(tokenizer.main, ["trian"], capsys)
    assert err.startswith("effdist tokenizer: error: argument action: invalid choice: 'trian'")
    err = _error(tokenizer.main, ["train", "--input", "x.jsonl", "--vocab-size", "abc", "--output", "t.json"], capsys)
    assert err == ("effdist tokenizer train: error: argument --vocab-size: invalid int value: 'abc'; "
                   "see effdist tokenizer train --help")


def test_under_a_launcher_only_local_rank_0_says_it(capsys, monkeypatch):
    """The other local ranks say nothing and wait before they exit: a launcher stops every worker once one exits
    with an error, and a silent rank leaving first got local rank 0 killed before its line (lifecycle)."""
    from effdist.runtime import lifecycle

    waits = []
    monkeypatch.setattr(lifecycle.time, "sleep", waits.append)
    monkeypatch.setattr(lifecycle.signal, "signal", lambda *args: None)  # pytest's own SIGTERM handling stays
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit) as e:
        planner.main(["--config", "llama-1b", "--gpus", "8", "--gpu-memory", "80", "--top-k", "3"])
    assert e.value.code == 2 and capsys.readouterr() == ("", "") and waits == [lifecycle.QUIET_RANK_EXIT_DELAY_S]
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit):
        planner.main(["--config", "llama-1b", "--gpus", "8", "--gpu-memory", "80", "--top-k", "3"])
    assert capsys.readouterr().err.startswith("effdist plan: error: unrecognized arguments: --top-k")
    assert waits == [lifecycle.QUIET_RANK_EXIT_DELAY_S]  # local rank 0 leaves at once


def test_help_is_still_the_full_usage(capsys):
    with pytest.raises(SystemExit) as e:
        planner.main(["--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: effdist plan")
