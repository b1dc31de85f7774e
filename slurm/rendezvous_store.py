"""`python slurm/rendezvous_store.py PORT`: host the c10d rendezvous store of one slurm/train.sbatch step.

Why not let torchrun host it: with ``--rdzv_backend=c10d`` the agent on the first node hosts the store in
its own process and exits as soon as its own workers are done, while the other nodes' agents still use
the store. After a successful run they close the rendezvous through it (a DistNetworkError trace and a
"failed to shutdown the rendezvous" warning); after a preemption, whose workers exit with 75 at nearly
the same moment, an agent still polling it dies with a RendezvousConnectionError traceback and exit 1.
Hosted here, by the batch script on the first node, the store outlives every agent (they are started
with ``--rdzv_conf=is_host=0``, so none of them tries to host it), and the batch script stops this
process by pid once srun has returned.

Prints ``ready`` once it listens (``ready PORT`` with ``--search N``: then, if PORT is taken, it listens on the
first free port of PORT+1..PORT+N and says which); runs until SIGHUP/SIGINT (the batch script sends SIGHUP). SIGUSR1 and SIGTERM
are ignored: Slurm sends them to every process of the job (`scancel` and `scontrol requeue` SIGTERM the batch
step's processes too, and so does the time limit), and they mean "save" to the trainers, whose agents still need
the store until their workers have saved and exited; a store that ended on that SIGTERM made every agent die
with a RendezvousConnectionError traceback and exit 1 while its workers were saving. Slurm's SIGKILL after
KillWait still ends it.
"""

from __future__ import annotations

import signal
import sys
from datetime import timedelta


def _parse(args: list[str]) -> tuple[int, int | None] | None:
    """(port, ports to search beyond it or None) from `PORT [--search N]`, or None when malformed."""
    if len(args) not in (1, 3) or not args[0].isdigit() or not 1 <= int(args[0]) <= 65535:
        return None
    if len(args) == 3:
        if args[1] != "--search" or not args[2].isdigit():
            return None
        return int(args[0]), int(args[2])
    return int(args[0]), None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    parsed = _parse(args)
    if parsed is None:
        print(f"usage: python {sys.argv[0]} PORT [--search N] (PORT a TCP port, 1..65535); got {' '.join(args)!r}",
              file=sys.stderr)
        return 2
    port, search = parsed
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(0))
    from torch.distributed import TCPStore

    # With --search, a taken port is no reason to fail the job: the derived default (29500 + job id % 10000) can
    # land on a port another job or an outgoing connection (Linux's ephemeral range starts at 32768) holds.
    candidates = range(port, min(port + (search or 0), 65535) + 1)
    for candidate in candidates:
        try:
            # The server listens on every interface; "localhost" is only this process's own client.
            store = TCPStore("localhost", candidate, is_master=True, wait_for_workers=False,
                             timeout=timedelta(seconds=60))
            break
        except (RuntimeError, ValueError) as e:
            error = e
    else:
        tried = f"ports {port}-{candidates[-1]}" if len(candidates) > 1 else f"port {port}"
        print(f"cannot host the rendezvous store on {tried}: {error}".splitlines()[0], file=sys.stderr)
        return 1
    print("ready" if search is None else f"ready {candidate}", flush=True)
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    del store
    return 0


if __name__ == "__main__":
    sys.exit(main())
