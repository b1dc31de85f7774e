"""The argument parser of every `effdist` command: a bad flag is one line, exit 2.

argparse prints its whole usage block (up to a dozen lines) above the one line that says what is wrong. Here
that line comes alone, with the nearest option for a misspelled one and where the options are listed:

    effdist train: error: unrecognized arguments: --sett (did you mean --set?) x=1; see effdist train --help

A misspelled required option is named as such, not only as the required one that is missing. Under a launcher
(torchrun, srun) only local rank 0 says it. `--help` is unchanged.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import NoReturn

from effdist.runtime.lifecycle import say_once_per_node

# How argparse's own messages start (Python 3.11-3.13), the ones that get "; see PROG --help"
_ARGPARSE_OWN = ("unrecognized arguments: ", "the following arguments are required", "argument ",
                 "one of the arguments", "ambiguous option", "expected one argument")


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line on stderr (exit 2). Sub-commands made with
    add_subparsers are of this class too."""

    _argv: list[str] | None = None  # the arguments of the last parse, for the hint on a misspelled option

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        outer = ArgumentParser._argv is None  # a sub-command's parser parses a share of the outer arguments
        if outer:
            ArgumentParser._argv = args
        try:
            return super().parse_known_args(args, namespace)
        finally:
            if outer:
                ArgumentParser._argv = None

    def _options(self) -> list[str]:
        return [o for o in self._option_string_actions if o.startswith("--")]

    def _hint(self, word: str) -> str:
        option = word.split("=", 1)[0]
        near = difflib.get_close_matches(option, self._options(), n=1, cutoff=0.6)
        return f"{word} (did you mean {near[0]}?)" if near else word

    def error(self, message: str) -> NoReturn:
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            words = message[len(prefix):].split(" ")
            message = prefix + " ".join(self._hint(w) if w.startswith("--") else w for w in words)
        elif message.startswith("the following arguments are required"):
            known = set(self._option_string_actions)
            unknown = [w for w in (ArgumentParser._argv or []) if w.startswith("--") and w.split("=", 1)[0]
                       not in known and not any(o.startswith(w.split("=", 1)[0]) for o in known)]
            if unknown:
                message += f"; unrecognized: {', '.join(self._hint(w) for w in unknown)}"
        if message.startswith(_ARGPARSE_OWN):  # a command's own p.error(...) line already says the fix
            message += f"; see {self.prog} --help"
        # every process of a launch (torchrun, srun) gets the same arguments: said once per node, not once per process
        say_once_per_node(f"{self.prog}: error: {message}")
        self.exit(2)
