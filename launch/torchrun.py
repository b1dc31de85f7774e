"""`python launch/torchrun.py [torchrun args]`: torchrun that keeps the trainer's "preempted" exit code.

Same arguments and behaviour as `torchrun` (it runs torch.distributed.run in this process), with two
differences that checkpoint-on-preempt needs:

1. Exit code. When workers fail, torchrun exits with 1 whatever their codes were. Here, when every
   failed worker exited with PREEMPTED_EXIT_CODE (75: saved a checkpoint, please requeue), this process
   exits with 75 too, so `srun` and slurm/train.sbatch can tell a preemption from a crash. (Workers
   that torchrun itself killed after the first exit, negative codes, are ignored; see all_preempted.)
2. SIGUSR1. Slurm's time-limit warning (``#SBATCH --signal=B:USR1@120``, forwarded by the batch script
   through srun) reaches this process; torchrun's own handlers ignore SIGUSR1 and its default action
   would kill the launcher. Here it is forwarded to the worker processes (direct children only: their
   own children, e.g. data-loader workers, would die of it), which save and exit with 75.

SIGTERM/SIGINT stay with torchrun: it forwards them to the workers and waits
TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30) before SIGKILL.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

FORWARDED_SIGNALS = (signal.SIGUSR1,)


def _preempted_exit_code() -> int:
    try:
        from effdist.runtime.launch_env import PREEMPTED_EXIT_CODE
    except ImportError:  # run from a checkout that is not pip-installed
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from effdist.runtime.launch_env import PREEMPTED_EXIT_CODE
    return PREEMPTED_EXIT_CODE


def _forward_to_workers(signum: int, _frame) -> None:
    import psutil

    workers = psutil.Process().children(recursive=False)
    print(f"[launch/torchrun] signal {signal.Signals(signum).name}: forwarding to {len(workers)} worker(s)",
          file=sys.stderr, flush=True)
    for worker in workers:
        try:
            worker.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def all_preempted(exit_codes: list[int], preempted_code: int) -> bool:
    """A clean preemption: some worker exited with the code and none exited with another code.

    Negative codes (killed by a signal) do not count against it: once the first worker has exited,
    torchrun SIGTERMs the others, and a worker that was about to exit with 75 after the collective save
    may die of that signal instead.
    """
    return preempted_code in exit_codes and all(code == preempted_code or code < 0 for code in exit_codes)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torch_run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    preempted_code = _preempted_exit_code()
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, _forward_to_workers)
    args = torch_run.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        torch_run.run(args)
    except ChildFailedError as e:
        codes = [failure.exitcode for failure in e.failures.values()]
        if all_preempted(codes, preempted_code):
            print(f"[launch/torchrun] workers saved and exited for a requeue: exit code {preempted_code}",
                  file=sys.stderr, flush=True)
            return preempted_code
        print(e.format_msg() if hasattr(e, "format_msg") else str(e), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
