"""`effdist <command> ...`: one entry point, each command implemented by its own module's main(argv)."""

from __future__ import annotations

import importlib
import signal
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("effdist.train.trainer", "pretrain a model (also: torchrun ... -m effdist.train)"),
    "presets": ("effdist.train.presets", "list the shipped configs with parameter counts and purpose"),
    "simulate": ("effdist.pipeline.simulate_cli", "predict memory and bubbles of a pipeline schedule"),
    "plan": ("effdist.train.planner", "choose tp/pp/dp, schedule and micro-batch under a memory budget"),
    "calibrate": ("effdist.train.calibrate", "measure layer, head and optimizer times on this GPU for plan"),
    "preprocess": ("effdist.data.preprocess", "tokenize text into megatron .bin/.idx datasets"),
    "tokenizer": ("effdist.data.tokenizer", "train a byte-level BPE tokenizer on local text"),
    "generate": ("effdist.infer.generate", "generate text from a checkpoint (KV cache, EPAS region)"),
    "eval": ("effdist.infer.evaluate", "held-out loss of a checkpoint at each EPAS inference region"),
    "convert": ("effdist.train.convert", "convert between HF LLaMA checkpoints and effdist (both ways)"),
    "plot": ("effdist.train.plot", "plot loss curves of one or more run directories"),
    "bench": ("effdist.bench", "run a benchmark from tools/"),
}


def usage() -> str:
    lines = ["usage: effdist <command> [args...]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `effdist <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    # First, before seconds of imports: the launcher (torchrun) that started this process, so that its death is
    # noticed even when it comes before the trainer watches for it.
    from effdist.runtime.lifecycle import note_launcher, report_interrupt, report_os_error

    note_launcher()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"effdist: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                print(f"effdist: the {name!r} command is not available in this build ({module_name} is missing)",
                      file=sys.stderr)
                return 2
            raise
        rc = module.main(rest)
    except KeyboardInterrupt:  # where the command does not handle it itself (the trainer does once started)
        return report_interrupt(name, while_starting=name == "train")
    except BrokenPipeError as e:
        if _stdout_reader_gone():  # `effdist presets | head -1`: head has what it wanted; nothing failed
            return 128 + signal.SIGPIPE
        return report_os_error(name, e)
    except OSError as e:  # an output that cannot be written, an input that cannot be read: name it, no traceback
        return report_os_error(name, e)
    return int(rc or 0)


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader closed it; then it points at /dev/null, so that the interpreter's
    final flush does not print a second BrokenPipeError."""
    from effdist.runtime.lifecycle import silence_broken_console

    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    return 1 in silence_broken_console()


if __name__ == "__main__":
    sys.exit(main())
