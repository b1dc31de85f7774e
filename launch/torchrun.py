"""`python launch/torchrun.py [torchrun args]`: torchrun that stops the way a checkpointing trainer needs.

Same arguments and behaviour as `torchrun` (it runs torch.distributed.run in this process), except for
signals and the exit code:

1. SIGTERM and SIGUSR1 (Slurm's preemption and time-limit warning, `kill`, `scancel`) are forwarded to the
   worker processes (direct children only: their own helpers die with them), and this process then waits
   for the workers, which finish their step, save a checkpoint and exit with PREEMPTED_EXIT_CODE (75), or
   exit at once with 128+signal when there was nothing to save yet (during setup or the first step). The
   workers bound that themselves (`parallel.timeout_s`); when TORCH_ELASTIC_SHUTDOWN_TIMEOUT is set, the
   workers still running that many seconds after the first signal are SIGKILLed. (Stock torchrun forwards
   SIGTERM too but then always exits with 1, and SIGUSR1 kills it.) Before the workers exist (rendezvous)
   a signal ends this process at once with 128+signal.
2. Exit code: 75 when some worker exited with 75 and no worker exited with another code (workers that
   torchrun killed after the first exit, negative codes, are ignored: see all_preempted); 0 when all
   finished; 128+signal when a signal stopped workers that had nothing to save; 2 when the workers refused
   to start (a usage or config error, each says why, the same code `effdist train` gives); 1 for any other
   failure, after one line per failed worker (stock torchrun exits 1 for all of these). 1 as well, after one
   line naming the address, when this launcher lost the c10d rendezvous (`--rdzv-backend c10d`): the process
   hosting its store (the first node's launcher, or slurm/rendezvous_store.py) is gone or cannot be reached.
   torchrun has then stopped this node's workers (SIGTERM, SIGKILL after TORCH_ELASTIC_SHUTDOWN_TIMEOUT);
   stock torchrun prints torch's traceback and C++ log lines with stack frames. This launcher's own C++ log
   lines are off for that reason (TORCH_CPP_LOG_LEVEL=FATAL unless set; the workers keep the caller's setting).
   A store never reached (`--rdzv-conf read_timeout`, default 60 s) is one line and 1 too. Lost after this
   node's workers finished (torchrun waiting for the other nodes' launchers): the workers' code and one line.
3. SIGINT, SIGHUP, SIGQUIT stay with torchrun (it forwards them, waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT
   seconds, default 30, then SIGKILLs); this process then exits with 128+signal and one line.

SIGKILL of this process cannot be handled here: each worker notices that its parent is gone and stops by
itself, saving first when it can (effdist.runtime.lifecycle).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

# Imported here, not in the signal handler: a handler that imports while the main thread is inside torch's imports
# can meet a partially initialised module (ImportError), and torch's optional imports swallow that, losing the
# signal (seen once under load: a SIGTERM during the launcher's first seconds left it running).
import psutil

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREFIX = "[launch/torchrun]"


def _preempted_exit_code() -> int:
    try:
        from effdist.runtime.launch_env import PREEMPTED_EXIT_CODE
    except ImportError:  # run from a checkout that is not pip-installed
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from effdist.runtime.launch_env import PREEMPTED_EXIT_CODE
    return PREEMPTED_EXIT_CODE


class _SaidByUs(logging.Filter):
    """torchrun's own lines about workers that exited ("failed (exitcode: 75)" on a clean preemption), the
    SIGTERMs it sends the others and the signal that stopped it: this launcher's closing line says the same, with
    what it means."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str)
                    and record.msg.startswith(("failed (exitcode", "Sending process", "Received %s death signal")))


class _ExitBarrierLost(logging.Filter):
    """torchrun's traceback when, this node's workers done, the agent could not wait for the other nodes' at the
    end because the rendezvous store went away (its host, the first node's launcher, exited or died first): one
    line instead. torchrun carries on and exits as its workers did."""

    def __init__(self, endpoint: str):
        super().__init__()
        self.endpoint = endpoint
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith("Error waiting on exit barrier")):
            return True
        self.said = True
        _say(f"this node's workers finished; the launchers of the other nodes could not be awaited: the rendezvous "
             f"store at {self.endpoint} is gone (the first node's launcher exited or died first)")
        return False


class _HeldBack(logging.Filter):
    """torchrun's warnings that a keep-alive heartbeat or the closing of the rendezvous failed because its store
    is gone (RendezvousConnectionError): held until torchrun returns, then dropped when this launcher's closing
    line is the lost rendezvous (it says the same), else emitted before that line."""

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []
        self.passing = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.passing or "due to an error of type RendezvousConnectionError" not in record.getMessage():
            return True
        self.held.append(record)
        return False

    def release(self, logger: logging.Logger) -> None:
        self.passing = True
        for record in self.held:
            logger.handle(record)
        self.held.clear()


def _say(msg: str) -> None:
    print(f"{PREFIX} {msg}", file=sys.stderr, flush=True)


class Forwarder:
    """Forwards SIGTERM/SIGUSR1 to the workers instead of letting torchrun tear them down."""

    def __init__(self):
        self.signum: int | None = None
        self._kill_timer: threading.Timer | None = None

    def install(self) -> None:
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, self.handle)

    def handle(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        workers = psutil.Process().children(recursive=False)
        if not workers:
            if "torch.distributed.elastic.multiprocessing.api" not in sys.modules:
                # Still importing torch (the first seconds): nothing was started, nothing to stop or save. An
                # exception raised here would surface inside that import, where library code may swallow it.
                _say(f"{name} before the workers started: exit code {128 + signum}")
                os._exit(128 + signum)
            from torch.distributed.elastic.multiprocessing.api import SignalException

            raise SignalException(f"{name} before the workers started", sigval=signal.Signals(signum))
        first = self.signum is None
        self.signum = self.signum or signum
        _say(f"{name}: forwarding to {len(workers)} worker(s); they save and exit (75) or stop at once (nothing "
             "to save yet)")
        for worker in workers:
            try:
                worker.send_signal(signum)
            except psutil.NoSuchProcess:
                pass
        timeout = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
        if first and timeout:
            self._kill_timer = threading.Timer(float(timeout), self._kill, args=(float(timeout),))
            self._kill_timer.daemon = True
            self._kill_timer.start()

    def _kill(self, timeout: float) -> None:
        workers = psutil.Process().children(recursive=False)
        if workers:
            _say(f"{len(workers)} worker(s) still running {timeout:g} s after the signal "
                 "(TORCH_ELASTIC_SHUTDOWN_TIMEOUT): SIGKILL")
        for worker in workers:
            try:
                worker.kill()
            except psutil.NoSuchProcess:
                pass

    def cancel(self) -> None:
        if self._kill_timer is not None:
            self._kill_timer.cancel()


def all_preempted(exit_codes: list[int], preempted_code: int) -> bool:
    """A clean preemption: some worker exited with the code and none exited with another code.

    Negative codes (killed by a signal) do not count against it: once the first worker has exited,
    torchrun SIGTERMs the others, and a worker that was about to exit with 75 after the collective save
    may die of that signal instead. A worker exits with 75 only after the collective save completed, so
    one 75 proves the checkpoint is complete.
    """
    return preempted_code in exit_codes and all(code == preempted_code or code < 0 for code in exit_codes)


USAGE_EXIT_CODE = 2  # effdist train: a usage or config error, found before training starts


def all_refused(exit_codes: list[int]) -> bool:
    """The workers that exited themselves all refused to start (exit 2); the others torchrun killed after."""
    return USAGE_EXIT_CODE in exit_codes and all(code == USAGE_EXIT_CODE or code < 0 for code in exit_codes)


def describe_failures(failures: dict) -> list[str]:
    """One line per failed worker, the first failure first. Timestamps are whole seconds: within one, a worker
    killed by SIGTERM (what torchrun sends the others once one has failed) comes after the rest."""
    lines = []
    order = sorted(failures.items(), key=lambda kv: (kv[1].timestamp, kv[1].exitcode == -signal.SIGTERM, kv[0]))
    for rank, f in order:
        how = (f"killed by {signal.Signals(-f.exitcode).name}" if f.exitcode < 0 else f"exited with {f.exitcode}")
        lines.append(f"rank {rank} (local rank {f.local_rank}, pid {f.pid}) {how}")
    return lines


def rendezvous_lost(e: BaseException, endpoint: str, signalled: str | None = None) -> str:
    """The closing line for a RendezvousConnectionError: the c10d store at `endpoint` was never reached, or was lost.

    Lost: the agent polls the store every --monitor-interval while its workers run (and while it joins), and the
    first failed call raises; torchrun's shutdown has stopped this node's workers by then (SIGTERM, SIGKILL after
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT). Nothing here knows whether they saved: a restart resumes from the newest
    complete checkpoint. Never reached: the error comes from creating the store client (torch's
    _create_tcp_store; were it renamed, such a failure would read as lost, still exit 1).
    """
    host = "the process hosting its store (the first node's launcher, or slurm/rendezvous_store.py)"
    if any(frame.f_code.co_name == "_create_tcp_store" for frame, _ in traceback.walk_tb(e.__traceback__)):
        cause = str(e.__cause__ or e).strip().splitlines()
        why = f" ({cause[0].rstrip('.')})" if cause else ""
        return (f"could not reach the rendezvous at {endpoint}{why}: check that {host} runs and that the address "
                "is right and reachable from this node: exit code 1")
    if signalled:  # a preemption: the first node's launcher may have exited once its own workers had saved
        return (f"lost the rendezvous at {endpoint} after {signalled} had reached this node ({host} exited or is "
                "gone); this node's workers were saving and are stopped now: start the job again, it resumes from "
                "the newest complete checkpoint (--resume auto): exit code 1")
    return (f"lost the rendezvous at {endpoint}: {host} is gone or unreachable; no worker of this node is left "
            "running; start the job again, it resumes from the newest checkpoint (--resume auto): exit code 1")


def main(argv: list[str] | None = None) -> int:
    forwarder = Forwarder()
    forwarder.install()  # first: a signal during the seconds of torch's import ends this process with one line
    # The C++ store client logs each failed call with a stack trace once the rendezvous store is gone or out of
    # reach, and repeats it at every later call (the closing line below says it once); torch reads the level
    # once, while it loads. Only for this process: the workers get the caller's environment back.
    cpp_log_level = os.environ.get("TORCH_CPP_LOG_LEVEL")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    try:
        preempted_code = _preempted_exit_code()
        from torch.distributed import run as torch_run
    finally:
        if cpp_log_level is None:
            os.environ.pop("TORCH_CPP_LOG_LEVEL", None)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

    for logger in ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api"):
        logging.getLogger(logger).addFilter(_SaidByUs())
    rendezvous_logger = logging.getLogger("torch.distributed.elastic.rendezvous.dynamic_rendezvous")
    held_back = _HeldBack()
    rendezvous_logger.addFilter(held_back)
    args = torch_run.parse_args(sys.argv[1:] if argv is None else argv)
    barrier_lost = _ExitBarrierLost(torch_run.get_rdzv_endpoint(args))
    logging.getLogger("torch.distributed.elastic.agent.server.api").addFilter(barrier_lost)
    try:
        nproc = torch_run.determine_local_world_size(args.nproc_per_node)
    except ValueError as e:  # torchrun raises it from deep inside, as a traceback
        nproc, why = 0, f" ({e})"
    else:
        why = ""
    if nproc < 1:
        _say(f"--nproc_per_node {args.nproc_per_node}: give a positive number of worker processes per node, or auto, "
             f"cpu, gpu{why}: exit code {USAGE_EXIT_CODE}")
        return USAGE_EXIT_CODE
    # The worker environment launch/run.sh and the hostfile launcher set (each overridable by the caller's): one
    # CUDA work queue for megatron's TP/SP overlap (megatron warns on every TP/SP start without it), NVLS off, and
    # the one OpenMP thread per process torchrun would set with a warning of its own.
    for name, value in (("CUDA_DEVICE_MAX_CONNECTIONS", "1"), ("NCCL_NVLS_ENABLE", "0"), ("OMP_NUM_THREADS", "1")):
        os.environ.setdefault(name, value)
    # torchrun installs its own handlers for --signals-to-handle when it starts the workers: keep it off ours.
    ours = {s.name for s in FORWARDED_SIGNALS}
    args.signals_to_handle = ",".join(s for s in args.signals_to_handle.split(",") if s.strip() not in ours)
    try:
        try:
            torch_run.run(args)
        except RendezvousConnectionError:
            held_back.held.clear()  # the closing line below says the same
            raise
        finally:
            if barrier_lost.said:  # its line says the same
                held_back.held.clear()
            held_back.release(rendezvous_logger)  # before any closing line
    except ChildFailedError as e:
        codes = [failure.exitcode for failure in e.failures.values()]
        if all_preempted(codes, preempted_code):
            _say(f"workers saved and exited for a requeue: exit code {preempted_code}")
            return preempted_code
        if all_refused(codes):
            _say(f"workers refused to start (see their lines above): exit code {USAGE_EXIT_CODE}")
            return USAGE_EXIT_CODE
        stop_codes = {128 + s for s in FORWARDED_SIGNALS}
        if forwarder.signum is not None and all(c in stop_codes or c < 0 or c == preempted_code for c in codes):
            code = 128 + forwarder.signum
            _say(f"workers stopped by {signal.Signals(forwarder.signum).name} before there was anything to save: "
                 f"exit code {code}")
            return code
        _say("workers failed: " + "; ".join(describe_failures(e.failures)) + " (first failure first; see their "
             "lines above)")
        return 1
    except SignalException as e:
        code = 128 + int(e.sigval)
        _say(f"stopped by {e.sigval.name}: exit code {code}")
        return code
    except RendezvousConnectionError as e:
        signalled = signal.Signals(forwarder.signum).name if forwarder.signum is not None else None
        _say(rendezvous_lost(e, torch_run.get_rdzv_endpoint(args), signalled))
        return 1
    finally:
        forwarder.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
