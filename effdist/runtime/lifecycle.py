"""How a trainer process stops: on a signal, when its launcher dies, when a peer rank dies, and with its helpers.

One `ProcessGuard` per process (`guard()`), installed by the trainer before anything slow starts:

- **SIGTERM / SIGUSR1.** While there is unsaved training state (`guard.unsaved`, set by the trainer after
  each step, cleared after each save) a signal only asks for a stop: the trainer finishes the step, saves and
  exits with 75. Otherwise (data preparation, index building, model construction, resume, the first step
  after a start or a save) there is nothing to save, and the handler raises `Stopped` at once: the process
  exits with 128 + the signal number (143 for SIGTERM) after one line.
- **Bounded.** A Python handler runs only between bytecodes of the main thread, so a main thread blocked in
  C (a collective, a rendezvous, a long tensor operation) would delay it. The C-level signal handler also
  writes to a wakeup pipe that a watchdog thread reads; the watchdog gives the main thread `STOP_GRACE_S`
  (nothing to save) or `parallel.timeout_s` (finish the step and save) and then ends the process itself
  with one line.
- **SIGINT (Ctrl-C)** does not save: it raises KeyboardInterrupt in the main thread, which the trainer turns
  into one line naming the checkpoint to resume from. Python runs a handler wherever the main thread is, and
  drops an exception raised inside an at-fork hook, a finalizer or a weakref callback ("Exception ignored
  in ..."): a Ctrl-C that lands while a checkpoint writer forks would be lost and training would go on. So
  the guard remembers the interrupt: `raise_if_interrupted` (each step and phase boundary) raises it again,
  and the watchdog ends the process with one line if it is still running `STOP_GRACE_S` later (also when the
  main thread was already on its way out, e.g. saving after a SIGTERM). The dropped one is not printed (a
  `sys.unraisablehook` keeps it quiet): one line per stop, no traceback.
- **The launcher died.** Under torchrun (``TORCHELASTIC_RUN_ID`` set) the launcher's agent is this process's
  parent. When the parent changes (it was SIGKILLed and this process was re-parented) the watchdog sends
  this process a SIGTERM, so it saves when it can and in any case stops within `parallel.timeout_s`. The
  parent is noted by the entry point (`note_launcher`) before seconds of imports, so a launcher that dies
  while the process starts is noticed too. A launcher often takes the reader of the process's output with it
  (``torchrun ... | tee log``): stdout/stderr pipes with no reader are then pointed at /dev/null
  (`silence_broken_console`) so that no thread dies of a BrokenPipeError, the watchdog least of all (it
  survives any error). Plain ``python -m effdist.train`` is not watched: ``nohup ... &`` then logging out
  must keep training.
- **A peer died.** Every rank records its host, pid and start time in the process group's store
  (`register_process`). The watchdog checks the ranks on its own host once a second; when one is gone
  without having said goodbye (`say_goodbye`) it stops this process within seconds with one line naming
  that rank (a peer blocked in a collective would otherwise wait up to the collective timeout with NCCL).
  A communication error in the main thread is turned into the same line by `describe_lost_peer`.
- **Helpers die with their rank.** Processes a rank forks (data-loader workers, megatron's asynchronous
  checkpoint writer and its worker processes) get a parent-death signal. megatron's asynchronous checkpoint
  writer also starts a `multiprocessing` manager process with the *spawn* method (a fresh interpreter,
  ~100-300 MB: it re-imports the trainer) to collect write results; that manager would outlive a killed
  rank forever. `bind_megatron_async_helpers` makes megatron start it with a parent-death signal too (and only
  for asynchronous saves: a synchronous save keeps its results in the rank).

Exit codes: 75 saved after a stop request (`PREEMPTED_EXIT_CODE`); 128 + signal when stopped before there
was anything to save or when the save did not finish in time; `PEER_LOST_EXIT_CODE` when a peer died.
This module imports no torch at the top: megatron's spawned manager process imports it to bind itself.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# effdist.runtime.launch_env.PREEMPTED_EXIT_CODE (not imported: that module is heavier than this one needs).
PREEMPTED_EXIT_CODE = 75
# How long the interpreter may take to exit once the main thread is done (teardown, helper shutdown).
EXIT_GRACE_S = 30.0
# How long the main thread gets to leave after a stop signal when there is nothing to save.
STOP_GRACE_S = 10.0
# How long a local peer may be gone before this process stops on its own (the main thread usually notices
# first, through a failed collective, and reports it itself).
PEER_GRACE_S = 3.0
WATCH_INTERVAL_S = 0.5
PEER_LOST_EXIT_CODE = 1
_PR_SET_PDEATHSIG = 1
_KEY = "effdist/proc/{rank}"
_GOODBYE = "effdist/left/{rank}"


class Stopped(BaseException):
    """A stop signal arrived when this process had nothing new to save; it should exit with `exit_code`:
    PREEMPTED_EXIT_CODE (75) when a checkpoint of the run holds everything done so far (`resume_point`:
    the one it resumed from or saved last), so a requeue loses nothing; 128 + the signal when the run has
    no checkpoint yet.

    A BaseException, like KeyboardInterrupt, so that `except Exception` in library code does not swallow it."""

    def __init__(self, signum: int, phase: str, resume_point: str | None = None):
        self.signum = signum
        name = signal.Signals(signum).name
        if resume_point:
            self.exit_code = PREEMPTED_EXIT_CODE
            text = (f"stopped by {name} during {phase}; nothing new to save: {resume_point} stays the checkpoint "
                    f"to resume from (exit code {self.exit_code}, start it again with --resume auto)")
        else:
            self.exit_code = 128 + signum
            text = (f"stopped by {name} during {phase}, before this run had anything to save (exit code "
                    f"{self.exit_code}; start it again to begin)")
        super().__init__(text)


def global_rank() -> int:
    """From the launcher's variables (torchrun, srun direct); the process group may not exist yet."""
    value = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    return int(value) if value.isdigit() else 0


def say(msg: str) -> None:
    """A notice on global rank 0 only (every rank sees the same signal or the same launcher death)."""
    if global_rank() == 0:
        print_to_console(f"[effdist] {msg}")


def print_to_console(line: str) -> None:
    """Write to stderr; where nobody reads it any more (a launcher or a `| tee` that died), silence the console
    instead of failing: a stop must not end in a BrokenPipeError before its save."""
    try:
        # One write, line and newline together: unbuffered (`python -u`, torchrun's workers) print() writes them
        # in two, and ranks stopping at once glued their lines into one.
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # broken pipe, closed stream
        silence_broken_console()


# Seconds a process other than its node's local rank 0 waits before leaving after a usage error every process
# finds (see say_once_per_node).
QUIET_RANK_EXIT_DELAY_S = 5.0


def is_local_rank_zero() -> bool:
    """Whether this process is the first of its node under a launcher (torchrun's LOCAL_RANK, srun's SLURM_LOCALID),
    or runs alone."""
    return (os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or "0") == "0"


def say_once_per_node(line: str) -> None:
    """A usage error every process of a launch finds the same (a bad flag, a config error), found before any
    process group: local rank 0 says it; the others say nothing and wait QUIET_RANK_EXIT_DELAY_S before the caller
    exits. The wait is why the line is not lost: a launcher (torchrun's agent, srun --kill-on-bad-exit) stops every
    worker as soon as one exits with an error, and a silent rank that left first got local rank 0 killed before it
    printed (seen on a loaded 2-core CI machine: a launch with a bad config key said nothing). Local rank 0 exits
    at once, and the launcher then stops the waiting ones."""
    if is_local_rank_zero():
        print_to_console(line)
        return
    try:  # the launcher's SIGTERM during the wait ends this process quietly: it has nothing to save or say
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # not the main thread: keep the handler
        pass
    time.sleep(QUIET_RANK_EXIT_DELAY_S)


def silence_broken_console() -> list[int]:
    """Point stdout/stderr at /dev/null where they are pipes whose reader is gone (every later write would raise
    BrokenPipeError in whatever thread logs next). Returns the file descriptors silenced."""
    import select

    silenced = []
    for fd in (1, 2):
        try:
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            broken = any(events & (select.POLLERR | select.POLLNVAL) for _, events in poller.poll(0))
        except (OSError, ValueError, AttributeError):  # no poll() on this platform: leave the console alone
            continue
        if broken:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)
            silenced.append(fd)
    return silenced


def resume_hint(checkpoint) -> str:
    """What a Ctrl-C stop leaves to resume from (the last complete checkpoint, or None), for the line that reports it."""
    if checkpoint:
        return f"the last checkpoint is {checkpoint} (--resume auto continues from it)"
    return "no checkpoint yet"


def report_interrupt(command: str, while_starting: bool) -> int:
    """One line for a Ctrl-C that a command did not handle itself (torch and megatron take seconds to import:
    no traceback from inside an import); returns the exit code, 130."""
    what = "while starting; nothing was saved" if while_starting else "(Ctrl-C)"
    print_to_console(f"effdist {command}: interrupted (SIGINT) {what}")
    return 128 + signal.SIGINT


def report_os_error(command: str, error: OSError) -> int:
    """One line for a file the command could not read or write (read-only, a directory where a file was
    meant, a missing parent), naming it; returns the exit code, 1. EFFDIST_TRACEBACK=1 raises it instead."""
    if os.environ.get("EFFDIST_TRACEBACK"):
        raise error
    where = error.filename if error.filename is not None else ""
    what = error.strerror or error
    if error.errno == errno.EEXIST and where and os.path.exists(where) and not os.path.isdir(where):
        what = "a file is in the way of a directory to create"  # mkdir(parents=True) of an output under a file
    print_to_console(f"effdist {command}: {what}" + (f": {where}" if where else "")
                     + " (EFFDIST_TRACEBACK=1 shows where)")
    return 1


def output_file_problem(flag: str, value: str | os.PathLike | None, example: str) -> str | None:
    """Why `value`, given with `flag` as a file for a command to write (--json, --svg, ...), cannot be that file,
    or None: a directory there is said before the command does its work (minutes, for some), not as
    report_os_error's line after it. `example` is a file name to suggest inside that directory. Other problems (a
    read-only or missing parent) still surface when the file is written."""
    if value is None or value in ("", "-") or not os.path.isdir(value):
        return None
    return f"{flag} {value} is a directory: give a file path, e.g. {os.path.join(value, example)}"


# The launcher this process was started by, noted by `note_launcher` as early as the entry point runs: a launcher
# that dies while torch and megatron are still being imported (seconds) must still be noticed.
_LAUNCHER_PID: int | None = None


def note_launcher() -> None:
    """Under torchrun (``TORCHELASTIC_RUN_ID``), remember the parent process now; `ProcessGuard.install` watches it."""
    global _LAUNCHER_PID
    if os.environ.get("TORCHELASTIC_RUN_ID") and _LAUNCHER_PID is None:
        parent = os.getppid()
        # Already orphaned (the launcher died while this interpreter started): re-parented to an init process,
        # which is no launcher. A torchrun agent is a Python process, also where it is PID 1 of a container.
        _LAUNCHER_PID = _GONE_BEFORE_NOTED if parent == 1 and not _runs_python(1) else parent


_GONE_BEFORE_NOTED = -1  # no process has this pid: the watchdog finds the launcher gone on its first look


def _runs_python(pid: int) -> bool:
    """Whether process `pid` runs a Python interpreter (True where that cannot be read: never a false alarm)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")[:2]
    except OSError:
        return True
    return any(b"python" in os.path.basename(a) or b"torchrun" in a for a in args)


# ------------------------------------------------------------------------------------ parent death

def die_with_parent(expected_parent: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send `sig` to this process when its parent exits (no-op elsewhere); exit now if the
    parent is already gone (the fork happened just before it died)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        return
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)


def become_helper(expected_parent: int | None = None) -> None:
    """This process helps its parent (a trainer rank): it dies with the parent and leaves stop signals to
    it. Launchers and schedulers signal whole process groups or cgroups (torchrun's killpg, Slurm's
    scancel): a helper that died of that SIGTERM would break the save its rank is finishing, and a forked
    helper would run the rank's inherited handler (and write to its wake-up pipe)."""
    die_with_parent(expected_parent)
    for s in (*STOP_SIGNALS, signal.SIGINT):
        try:
            signal.signal(s, signal.SIG_IGN)
        except (ValueError, OSError):  # not the main thread of the child: keep what it has
            return
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass


def _bind_forked_child() -> None:
    become_helper()


_fork_hook_installed = False


def bind_forked_children() -> None:
    """Every process this one forks from now on dies when this one dies (data-loader workers, megatron's
    checkpoint writer). Children started with fork+exec (subprocess, spawn) are not covered by this."""
    global _fork_hook_installed
    if not _fork_hook_installed and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_bind_forked_child)
        _fork_hook_installed = True


def bind_megatron_async_helpers() -> None:
    """megatron.core.dist_checkpointing's asynchronous writer collects its results through a spawn-context
    `multiprocessing.Manager()` whose server process lives until the interpreter exits normally; after a
    SIGKILL of the rank it would be left behind. Have it started with an initializer that binds its server to
    this process (patch ``write-results`` in effdist.runtime.megatron_patches, which also keeps synchronous
    saves from starting it at all)."""
    try:
        from effdist.runtime.megatron_patches import install_write_results

        install_write_results(initializer=become_helper, initargs=(os.getpid(),))
    except ImportError:  # no megatron-core: nothing to bind
        return


# ------------------------------------------------------------------------------------ peers

@dataclass(frozen=True)
class ProcessRecord:
    rank: int
    host: str
    pid: int
    start_ticks: int  # from /proc/PID/stat: tells a reused pid apart

    def encode(self) -> str:
        return f"{self.host} {self.pid} {self.start_ticks}"

    @classmethod
    def decode(cls, rank: int, raw: bytes | str) -> ProcessRecord:
        host, pid, ticks = (raw.decode() if isinstance(raw, bytes) else raw).split()
        return cls(rank, host, int(pid), int(ticks))

    def alive(self) -> bool:
        """Running (not a zombie) and still the same process."""
        stat = _proc_stat(self.pid)
        return stat is not None and stat[0] != "Z" and stat[1] == self.start_ticks

    def describe(self) -> str:
        return f"rank {self.rank} (pid {self.pid} on {self.host})"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a process, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def this_process(rank: int) -> ProcessRecord:
    stat = _proc_stat(os.getpid())
    return ProcessRecord(rank, socket.gethostname(), os.getpid(), stat[1] if stat else 0)


def register_process(store, rank: int) -> None:
    """Record this rank's host, pid and start time in the process group's store (see `ProcessGuard`)."""
    store.set(_KEY.format(rank=rank), this_process(rank).encode())


def say_goodbye(store, rank: int) -> None:
    """Tell the peers that this rank leaves on purpose, so its exit is not taken for a death."""
    try:
        store.set(_GOODBYE.format(rank=rank), "1")
    except Exception:  # noqa: BLE001 - the store's host may have left first; nobody is left to tell
        pass


# ------------------------------------------------------------------------------------ the guard

class ProcessGuard:
    def __init__(self):
        self.timeout_s = 600.0
        self.unsaved = False  # set by the trainer: state exists that a save would keep
        self.requested = False  # a stop was requested while there was state to save
        # The watchdog stops this process with its own SIGTERM when the launcher is gone, after saying so: the
        # handler then does not announce a SIGTERM that no one sent.
        self._self_stopped = False
        self.signum: int | None = None
        self.leaving = False  # the main thread is on its way out: later signals change nothing
        self.interrupted = False  # a SIGINT arrived (its KeyboardInterrupt may have been swallowed)
        self.phase = "setup"
        # The checkpoint that holds everything this process did so far (resumed from or saved last): a stop
        # with nothing new to save then exits 75 for a requeue. None until there is one.
        self.resume_point: str | None = None
        self._installed = False
        self._deadline: float | None = None
        self._deadline_code = 1
        self._deadline_why = ""
        self._wake_r = self._wake_w = -1
        self._parent: int | None = None
        self._parent_lock = threading.Lock()  # the watchdog and finish() both may notice the launcher gone
        self._store = None
        self._rank = 0
        self._local_ranks: list[int] = []
        self._peers: dict[int, ProcessRecord] = {}
        self._thread: threading.Thread | None = None
        self._unraisablehook = sys.unraisablehook
        self._deadline_lock = threading.Lock()  # the watchdog and finish() both set the deadline

    # -- installation ------------------------------------------------------------------------
    def install(self, timeout_s: float) -> None:
        """Handlers for SIGTERM/SIGUSR1, the watchdog thread, helper binding. Main thread only."""
        self.timeout_s = float(timeout_s)
        bind_forked_children()
        bind_megatron_async_helpers()
        if self._installed:
            return
        try:
            for s in STOP_SIGNALS:
                signal.signal(s, self._on_signal)
            # Only where Python's own Ctrl-C handler is in place: a SIGINT inherited as ignored (a shell's
            # background job, nohup) stays ignored.
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                signal.signal(signal.SIGINT, self._on_interrupt)
        except ValueError:  # not the main thread (tests calling Trainer in a thread): leave signals alone
            return
        self._unraisablehook = sys.unraisablehook
        sys.unraisablehook = self._on_unraisable
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        if os.environ.get("TORCHELASTIC_RUN_ID"):
            self._parent = _LAUNCHER_PID if _LAUNCHER_PID is not None else os.getppid()
        self._installed = True
        self._thread = threading.Thread(target=self._watch, name="effdist-watchdog", daemon=True)
        self._thread.start()

    def watch_peers(self, store, rank: int, local_ranks: list[int]) -> None:
        """Watch the ranks that share this host (their records are read by the watchdog when they appear)."""
        self._store, self._rank = store, rank
        self._local_ranks = [r for r in local_ranks if r != rank]

    def finish(self, exit_code: int) -> None:
        """The main thread is done: stop watching peers and the launcher, tell the peers this was on purpose,
        and bound what is left (interpreter exit, helper shutdown) to EXIT_GRACE_S; then exit with
        `exit_code` regardless."""
        self.leaving = True
        if self._store_reachable():
            say_goodbye(self._store, self._rank)
        # Another rank may have noticed the launcher's death first and the agreed stop ended this rank before its
        # watchdog looked: say it here, so the log tells why the run stopped whichever rank saw it.
        self._launcher_gone()
        with self._parent_lock:
            self._parent = None
        due = time.monotonic() + EXIT_GRACE_S
        with self._deadline_lock:
            if self._deadline is not None and self._deadline_code == 128 + signal.SIGINT and self._deadline <= due:
                return  # a Ctrl-C's bound is shorter: keep it
            self._deadline, self._deadline_code = due, exit_code
            self._deadline_why = (f"the process did not exit within {EXIT_GRACE_S:g} s of finishing; exiting with "
                                  f"{exit_code}")

    # -- signals -------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame) -> None:
        if self.leaving:
            return
        first = self.signum is None
        self.signum = self.signum or signum
        if self.unsaved:
            if first and not self._self_stopped:
                say(f"received {signal.Signals(signum).name}: will save a checkpoint after this step and exit")
            self.requested = True
            return
        self.leaving = True
        raise self.stopped(signum)

    def _on_interrupt(self, _signum: int, _frame) -> None:
        if self.leaving:  # already on its way out (a requeue save, the exit itself): the deadlines bound it
            return
        self.interrupted = True
        raise KeyboardInterrupt

    def _on_unraisable(self, unraisable) -> None:
        # A stop this guard raised where Python drops it (module notes): a Ctrl-C is raised again at the next
        # boundary, a SIGTERM/SIGUSR1 stop is ended by the watchdog with its line. Neither is worth a traceback.
        if (issubclass(unraisable.exc_type, KeyboardInterrupt) and self.interrupted) or \
                issubclass(unraisable.exc_type, Stopped):
            return
        self._unraisablehook(unraisable)

    def raise_if_interrupted(self) -> None:
        """Raise the KeyboardInterrupt of a Ctrl-C that Python dropped (see the module notes). Main thread."""
        if self.interrupted and not self.leaving:
            raise KeyboardInterrupt

    def stopped(self, signum: int | None = None) -> Stopped:
        return Stopped(signum or self.signum or signal.SIGTERM, self.phase, self.resume_point)

    def enter(self, phase: str) -> None:
        """The main thread starts `phase` (named in the line a stop prints). Fault injection for tests and
        drills: EFFDIST_FAULT_STALL_PHASE=<phase> holds global rank 0 there until it is signalled."""
        self.raise_if_interrupted()
        self.phase = phase
        if os.environ.get("EFFDIST_FAULT_STALL_PHASE") == phase and global_rank() == 0:
            say(f"fault injection (EFFDIST_FAULT_STALL_PHASE): rank 0 holds in {phase}")
            while True:
                time.sleep(3600)

    def _arm_interrupt(self) -> None:
        """Ctrl-C: whatever the main thread is doing (a step, a save that a SIGTERM asked for, the exit), the
        process ends STOP_GRACE_S later at the latest."""
        due = time.monotonic() + STOP_GRACE_S
        with self._deadline_lock:
            if self._deadline is not None and self._deadline <= due:
                return
            self._deadline, self._deadline_code = due, 128 + signal.SIGINT
            # Worded when it fires: a save may complete meanwhile.
            self._deadline_why = lambda: (f"interrupted (SIGINT) during {self.phase}: still running "
                                          f"{STOP_GRACE_S:g} s later, exiting now; steps since the last save are "
                                          f"lost; {resume_hint(self.resume_point)}")

    def _arm(self, signum: int) -> None:
        if self._deadline is not None:
            return
        name = signal.Signals(signum).name
        if self.unsaved:
            self._deadline = time.monotonic() + self.timeout_s
            self._deadline_why = (f"the step in progress and the checkpoint did not finish within "
                                  f"parallel.timeout_s={self.timeout_s:g} s of {name}; exiting without saving")
            self._deadline_code = 128 + signum
        else:
            self._deadline = time.monotonic() + STOP_GRACE_S
            stopped = self.stopped(signum)
            self._deadline_why = f"{stopped} (the main thread was busy in native code)"
            self._deadline_code = stopped.exit_code

    # -- the watchdog thread --------------------------------------------------------------------
    def _watch(self) -> None:
        gone_since: dict[int, float] = {}
        while True:
            try:
                self._watch_once(gone_since)
            except Exception:  # noqa: BLE001 - the watchdog bounds every stop: no single failure may end it
                time.sleep(WATCH_INTERVAL_S)

    def _stop_if_launcher_gone(self) -> None:
        """The launcher is gone: stop as its SIGTERM would have (save first if a step finished), by sending that
        signal to this process; the notice `_launcher_gone` prints says why, so the handler does not announce it."""
        if self._launcher_gone():
            self._self_stopped = True
            os.kill(os.getpid(), signal.SIGTERM)

    def _watch_once(self, gone_since: dict[int, float]) -> None:
        import select

        ready, _, _ = select.select([self._wake_r], [], [], WATCH_INTERVAL_S)
        if ready:
            for signum in os.read(self._wake_r, 64):
                if signum == signal.SIGINT:
                    self._arm_interrupt()
                elif signum in {int(s) for s in STOP_SIGNALS}:
                    with self._deadline_lock:
                        self._arm(signum)
        now = time.monotonic()
        with self._deadline_lock:
            due, code, why = self._deadline, self._deadline_code, self._deadline_why
        if due is not None and now > due:
            self._exit(code, why() if callable(why) else why)
        self._stop_if_launcher_gone()
        for peer in [] if self.leaving else self._dead_local_peers():
            since = gone_since.setdefault(peer.rank, now)
            if now - since > PEER_GRACE_S and not self.leaving and not self._said_goodbye(peer.rank):
                self._exit(PEER_LOST_EXIT_CODE, peer_lost_message(peer))

    def _launcher_gone(self) -> bool:
        """True (after one notice) for the first caller that finds the watched launcher gone; then never again."""
        with self._parent_lock:
            if self._parent is None or os.getppid() == self._parent:
                return False
            silence_broken_console()  # a launcher that died often took the reader of our output with it
            say(f"the launcher (pid {self._parent}) is gone: stopping (saving first if a step finished)")
            self._parent = None
            return True

    def _exit(self, code: int, why: str) -> None:
        from effdist.runtime.progress import end_bar

        try:
            end_bar()
            print_to_console(f"effdist: error (rank {self._rank}): {why}")
        finally:
            os._exit(code)

    def _load_peers(self) -> None:
        missing = [r for r in self._local_ranks if r not in self._peers]
        if not missing or not self._store_reachable():
            return
        try:
            keys = [_KEY.format(rank=r) for r in missing]
            if not self._store.check(keys):
                return
            for r, raw in zip(missing, self._store.multi_get(keys)):
                record = ProcessRecord.decode(r, raw)
                if record.host == socket.gethostname():
                    self._peers[r] = record
                else:  # not on this host after all (an unusual rank layout): not watched by pid
                    self._local_ranks.remove(r)
        except Exception:  # noqa: BLE001 - store unreachable: nothing to learn now
            return

    def _dead_local_peers(self) -> list[ProcessRecord]:
        self._load_peers()
        return [p for p in self._peers.values() if not p.alive()]

    def _store_reachable(self) -> bool:
        """False when the store's host is known to be gone. With a plain env:// start global rank 0 hosts
        the store (under torchrun its agent does): talking to a dead host makes c10d print stack traces."""
        if self._store is None:
            return False
        host = None if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else 0
        record = self._peers.get(host) if host is not None else None
        return record is None or record.alive()

    def _said_goodbye(self, rank: int) -> bool:
        if not self._store_reachable():
            return False
        try:
            return bool(self._store.check([_GOODBYE.format(rank=rank)]))
        except Exception:  # noqa: BLE001 - store gone with its host: treat as not announced
            return False

    # -- diagnosis for the main thread ----------------------------------------------------------
    def lost_peer(self) -> ProcessRecord | None:
        """A rank on this host that died without saying goodbye, if any."""
        return next((p for p in self._dead_local_peers() if not self._said_goodbye(p.rank)), None)


def peer_lost_message(peer: ProcessRecord) -> str:
    return (f"{peer.describe()} died; stopping this rank too. Start the run again to resume from its newest "
            "checkpoint (its log says why it died)")


def describe_lost_peer(error: BaseException) -> str | None:
    """One line for a communication error caused by a dead peer, or None when it is not one."""
    g = guard()
    peer = g.lost_peer()
    if peer is not None:
        return peer_lost_message(peer)
    text = f"{type(error).__name__}: {error}"
    markers = ("Connection reset", "Connection closed", "Connection refused", "Broken pipe", "DistNetworkError",
               "DistStoreError", "Socket Timeout", "failed to recv", "NCCL communicator was aborted")
    if any(m in text for m in markers):
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (f"lost the connection to another rank ({first[:200]}); a process on another host probably died: "
                "see its log. Start the run again to resume from its newest checkpoint")
    return None


_GUARD = ProcessGuard()


def guard() -> ProcessGuard:
    return _GUARD
