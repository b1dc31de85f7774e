"""Which process am I? The launcher's environment variables -> rank, world size, rendezvous address.

`resolve_dist_env(env)` is a pure function of a mapping (pass `os.environ`), so every launcher layout is
tested with fake dicts. Three launchers are recognised, in this order:

1. **torchrun** (or any ``env://`` launcher): ``RANK`` is set. Reads ``RANK``, ``WORLD_SIZE``,
   ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK`` (node rank), ``GROUP_WORLD_SIZE`` (nodes),
   ``MASTER_ADDR``, ``MASTER_PORT``. This wins over Slurm variables, because torchrun under ``srun``
   (slurm/train.sbatch) sees both and torchrun's are the ones that describe the workers.
2. **srun direct**, one task per GPU: ``SLURM_PROCID`` is set. ``RANK = SLURM_PROCID``,
   ``WORLD_SIZE = SLURM_NTASKS``, ``LOCAL_RANK = SLURM_LOCALID``, node rank ``SLURM_NODEID``, tasks on
   this node from ``SLURM_STEP_TASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE`` / ``SLURM_NTASKS_PER_NODE``
   (forms like ``4(x2),3``), master = first host of the node list (``node[01-03,07],gpu5`` is expanded
   here, no ``scontrol`` needed) unless ``MASTER_ADDR`` is set, port ``MASTER_PORT`` or
   ``29500 + SLURM_JOB_ID % 10000`` (two jobs sharing a node then rarely collide).
3. **single process**: neither -> rank 0 of 1 at ``MASTER_ADDR`` or 127.0.0.1, port ``MASTER_PORT`` or 29500.

`rendezvous_host(hostlist)` picks the address of a job's first node that the other nodes can reach (the
c10d rendezvous host of slurm/train.sbatch): ``python -m effdist.runtime.launch_env rendezvous-host
"$SLURM_JOB_NODELIST"`` prints it.

``EFFDIST_LAUNCHER=torchrun|slurm|single`` forces one reading, e.g. ``single`` for a plain ``python -m
effdist.train`` inside an ``salloc`` shell whose Slurm variables describe the allocation, not this process.

Inconsistent variables (rank >= world size, ``RANK`` without ``WORLD_SIZE``, a non-integer, ...) raise
`LaunchEnvError` naming the variables and their values, before any process group is started.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

# EX_TEMPFAIL from sysexits.h: "try again later". The trainer exits with it after saving a checkpoint on
# SIGTERM/SIGUSR1; launch/torchrun.py passes it through and slurm/train.sbatch turns it into a requeue.
PREEMPTED_EXIT_CODE = 75

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
LAUNCHERS = ("torchrun", "slurm", "single")


class LaunchEnvError(ValueError):
    """The launcher's environment variables are missing or contradict each other."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    nnodes: int
    master_addr: str
    master_port: int
    launcher: str  # one of LAUNCHERS

    def as_torch_env(self) -> dict[str, str]:
        """The variables `torch.distributed.init_process_group(init_method="env://")` and torchrun use."""
        return {
            "RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size), "GROUP_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port),
        }


def resolve_dist_env(env: Mapping[str, str]) -> DistEnv:
    """Map a launcher's environment to this process's place in the job (see the module docstring)."""
    forced = env.get("EFFDIST_LAUNCHER", "").strip().lower()
    if forced and forced not in LAUNCHERS:
        raise LaunchEnvError(f"EFFDIST_LAUNCHER={env['EFFDIST_LAUNCHER']!r}: expected one of {', '.join(LAUNCHERS)}")
    launcher = forced or _detect(env)
    if launcher == "torchrun":
        return _from_torchrun(env)
    if launcher == "slurm":
        return _from_slurm(env)
    return _single(env)


def _detect(env: Mapping[str, str]) -> str:
    if "RANK" in env:
        return "torchrun"
    for partial in ("WORLD_SIZE", "LOCAL_RANK"):
        if partial in env and _int(env, partial) != (1 if partial == "WORLD_SIZE" else 0):
            # A half-set torchrun environment must not silently become a single process (it would hang
            # its peers or train alone).
            raise LaunchEnvError(f"{partial}={env[partial]} is set but RANK is not: set RANK (and WORLD_SIZE, "
                                 "MASTER_ADDR, MASTER_PORT), or launch with torchrun")
    if "SLURM_PROCID" in env:
        return "slurm"
    return "single"


def _from_torchrun(env: Mapping[str, str]) -> DistEnv:
    if "RANK" not in env:
        raise LaunchEnvError("EFFDIST_LAUNCHER=torchrun but RANK is not set")
    if "WORLD_SIZE" not in env:
        raise LaunchEnvError(f"RANK={env['RANK']} is set but WORLD_SIZE is not: set WORLD_SIZE to the total number "
                             "of processes (torchrun sets both)")
    rank, world_size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    _check_world(rank, "RANK", world_size, "WORLD_SIZE")
    # Without LOCAL_* the processes are taken to share one node (a hand-written env:// launch).
    local_world_size = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world_size
    if "LOCAL_WORLD_SIZE" in env:
        if not 1 <= local_world_size <= world_size:
            raise LaunchEnvError(f"LOCAL_WORLD_SIZE={local_world_size} must be between 1 and WORLD_SIZE={world_size}")
    local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank % local_world_size
    if not 0 <= local_rank < local_world_size:
        raise LaunchEnvError(f"LOCAL_RANK={local_rank} is outside 0..LOCAL_WORLD_SIZE-1 "
                             f"(LOCAL_WORLD_SIZE={local_world_size})")
    nnodes = _first_int(env, ("GROUP_WORLD_SIZE", "NNODES"), default=-(-world_size // local_world_size))
    node_rank = _first_int(env, ("GROUP_RANK", "NODE_RANK"), default=rank // local_world_size)
    if not 0 <= node_rank < nnodes:
        raise LaunchEnvError(f"node rank {node_rank} (GROUP_RANK/NODE_RANK) is outside 0..{nnodes - 1} "
                             f"({nnodes} nodes from GROUP_WORLD_SIZE/NNODES or WORLD_SIZE/LOCAL_WORLD_SIZE)")
    if world_size > 1 and "MASTER_ADDR" not in env:
        raise LaunchEnvError(f"RANK={rank} WORLD_SIZE={world_size} are set but MASTER_ADDR is not: set it to the "
                             "host of rank 0 (and MASTER_PORT), or launch with torchrun")
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, local_world_size=local_world_size,
                   node_rank=node_rank, nnodes=nnodes, master_addr=env.get("MASTER_ADDR", DEFAULT_MASTER_ADDR),
                   master_port=_port(env), launcher="torchrun")


def _from_slurm(env: Mapping[str, str]) -> DistEnv:
    if "SLURM_PROCID" not in env:
        raise LaunchEnvError("EFFDIST_LAUNCHER=slurm but SLURM_PROCID is not set (run under srun)")
    rank = _int(env, "SLURM_PROCID")
    ntasks_var = "SLURM_NTASKS" if "SLURM_NTASKS" in env else "SLURM_NPROCS"
    if ntasks_var not in env:
        raise LaunchEnvError(f"SLURM_PROCID={rank} is set but SLURM_NTASKS is not: launch with srun "
                             "(inside sbatch, python started without srun is not one of the tasks)")
    world_size = _int(env, ntasks_var)
    _check_world(rank, "SLURM_PROCID", world_size, ntasks_var)
    if "SLURM_LOCALID" not in env:
        raise LaunchEnvError("SLURM_PROCID is set but SLURM_LOCALID is not: launch with srun")
    local_rank = _int(env, "SLURM_LOCALID")
    node_rank = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0

    nodelist_var = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(v)),
                        None)
    hosts = expand_hostlist(env[nodelist_var]) if nodelist_var else []
    nnodes = _first_int(env, ("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"),
                        default=len(hosts) or 1)
    if not 0 <= node_rank < nnodes:
        raise LaunchEnvError(f"SLURM_NODEID={node_rank} is outside 0..{nnodes - 1} (SLURM_NNODES={nnodes})")

    local_world_size = _slurm_tasks_on_node(env, node_rank, nnodes, world_size)
    if not 0 <= local_rank < local_world_size:
        raise LaunchEnvError(f"SLURM_LOCALID={local_rank} is outside 0..{local_world_size - 1} "
                             f"({local_world_size} tasks on node {node_rank})")

    if "MASTER_ADDR" in env:
        master_addr = env["MASTER_ADDR"]
    elif world_size == 1:
        master_addr = DEFAULT_MASTER_ADDR
    elif hosts:
        master_addr = hosts[0]
    else:
        raise LaunchEnvError(f"SLURM_NTASKS={world_size} but neither SLURM_JOB_NODELIST nor MASTER_ADDR is set: "
                             "cannot tell which host runs rank 0; set MASTER_ADDR")
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, local_world_size=local_world_size,
                   node_rank=node_rank, nnodes=nnodes, master_addr=master_addr, master_port=_port(env),
                   launcher="slurm")


def _slurm_tasks_on_node(env: Mapping[str, str], node_rank: int, nnodes: int, world_size: int) -> int:
    # The step's own layout first: an srun inside an allocation may use fewer tasks than the job.
    for var in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        if env.get(var):
            counts = parse_tasks_per_node(env[var], var)
            if len(counts) == 1:
                return counts[0]  # one number: the same on every node
            if len(counts) != nnodes:
                raise LaunchEnvError(f"{var}={env[var]} describes {len(counts)} nodes but the step has {nnodes}")
            if sum(counts) != world_size:
                raise LaunchEnvError(f"{var}={env[var]} adds up to {sum(counts)} tasks but SLURM_NTASKS={world_size}")
            return counts[node_rank]
    if world_size % nnodes:
        raise LaunchEnvError(f"SLURM_NTASKS={world_size} tasks do not split evenly over {nnodes} nodes and "
                             "SLURM_TASKS_PER_NODE is not set")
    return world_size // nnodes


def _single(env: Mapping[str, str]) -> DistEnv:
    return DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, nnodes=1,
                   master_addr=env.get("MASTER_ADDR", DEFAULT_MASTER_ADDR), master_port=_port(env), launcher="single")


def _port(env: Mapping[str, str]) -> int:
    if "MASTER_PORT" in env:
        port = _int(env, "MASTER_PORT")
        if not 1 <= port <= 65535:
            raise LaunchEnvError(f"MASTER_PORT={port} is not a TCP port (1..65535)")
        return port
    job_var = "SLURM_JOB_ID" if "SLURM_JOB_ID" in env else "SLURM_JOBID"
    if job_var in env:
        return DEFAULT_MASTER_PORT + _int(env, job_var) % 10000
    return DEFAULT_MASTER_PORT


def _int(env: Mapping[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw.strip())
    except ValueError:
        raise LaunchEnvError(f"{name}={raw!r} is not an integer") from None


def _first_int(env: Mapping[str, str], names: tuple[str, ...], default: int) -> int:
    for name in names:
        if env.get(name, "").strip():
            return _int(env, name)
    return default


def _check_world(rank: int, rank_var: str, world_size: int, world_var: str) -> None:
    if world_size < 1:
        raise LaunchEnvError(f"{world_var}={world_size} must be at least 1")
    if not 0 <= rank < world_size:
        raise LaunchEnvError(f"{rank_var}={rank} is outside 0..{world_size - 1} ({world_var}={world_size})")


_TASKS_ITEM = re.compile(r"^\s*(\d+)\s*(?:\(\s*x\s*(\d+)\s*\))?\s*$")


def parse_tasks_per_node(spec: str, name: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """``"4(x2),3"`` -> ``[4, 4, 3]``: Slurm's run-length form of tasks on each node."""
    counts: list[int] = []
    for item in spec.split(","):
        m = _TASKS_ITEM.match(item)
        if not m:
            raise LaunchEnvError(f"{name}={spec!r}: cannot read {item!r} (expected forms like 4 or 4(x2))")
        count, repeat = int(m.group(1)), int(m.group(2) or 1)
        if count < 1 or repeat < 1:
            raise LaunchEnvError(f"{name}={spec!r}: counts must be positive")
        counts += [count] * repeat
    return counts


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list -> host names, in order.

    ``node[01-03,07],gpu5`` -> node01 node02 node03 node07 gpu5. Zero padding follows the width of the
    range's lower bound; several bracket groups in one name (``r[1-2]n[1-2]``) give their product, as
    ``scontrol show hostnames`` does.
    """
    hosts: list[str] = []
    for name in _split_top_level(hostlist):
        hosts += _expand_name(name, hostlist)
    return hosts


def _split_top_level(hostlist: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in hostlist.strip():
        if ch == "[":
            depth += 1
            if depth > 1:
                raise LaunchEnvError(f"host list {hostlist!r}: nested '['")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchEnvError(f"host list {hostlist!r}: ']' without '['")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise LaunchEnvError(f"host list {hostlist!r}: '[' without ']'")
    parts.append("".join(current))
    names = [p.strip() for p in parts]
    if any(not n for n in names):
        raise LaunchEnvError(f"host list {hostlist!r}: empty host name")
    return names


def _expand_name(name: str, hostlist: str) -> list[str]:
    open_at = name.find("[")
    if open_at < 0:
        return [name]
    close_at = name.index("]", open_at)
    prefix, ranges, rest = name[:open_at], name[open_at + 1:close_at], name[close_at + 1:]
    suffixes = _expand_name(rest, hostlist) if rest else [""]
    out = []
    for piece in ranges.split(","):
        lo, sep, hi = piece.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise LaunchEnvError(f"host list {hostlist!r}: cannot read range {piece!r} in {name!r}")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise LaunchEnvError(f"host list {hostlist!r}: descending range {piece!r}")
        width = len(lo)
        out += [f"{prefix}{i:0{width}d}{s}" for i in range(first, last + 1) for s in suffixes]
    return out


# ------------------------------------------------------------------------------------ rendezvous address
def resolve_host(name: str) -> list[str]:
    """Every address `name` resolves to (getaddrinfo: /etc/hosts, DNS, ...), IPv4 first, in resolver order."""
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    addrs: list[str] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for fam, _, _, _, sockaddr in infos:
            if fam == family and sockaddr[0] not in addrs:
                addrs.append(sockaddr[0])
    return addrs


def local_address_towards(addr: str) -> str | None:
    """The address of the interface this host sends from to reach `addr` (a UDP connect sends no packet)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((addr, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def _is_loopback(addr: str) -> bool:
    return ipaddress.ip_address(addr.split("%")[0]).is_loopback


def rendezvous_host(hostlist: str, this_node: str | None = None,
                    resolve: Callable[[str], Sequence[str]] = resolve_host,
                    route_from_here: Callable[[str], str | None] = local_address_towards) -> str:
    """The address at which the other nodes of a job reach its first node: where the c10d rendezvous runs.

    `hostlist` is Slurm's compressed node list (``SLURM_JOB_NODELIST``); `this_node` the node this runs on
    (``SLURMD_NODENAME``; the batch script runs on the first node). `hostname --ip-address` is not used: it
    returns a loopback address on hosts whose /etc/hosts maps their own name to 127.0.1.1 (Debian's default).

    1. The first node's name resolved: its first address that is not loopback (IPv4 before IPv6).
    2. If it resolves only to loopback (or not at all) and this process runs on that node: the local
       address this host uses to reach the first other node that resolves to a non-loopback address.
    3. If every node resolves only to loopback, they are all this machine (one host, e.g. an emulated
       cluster): the loopback address.
    Otherwise a LaunchEnvError names the node, what it resolved to, and HEAD_ADDR as the way out.
    """
    nodes = expand_hostlist(hostlist)
    if not nodes:
        raise LaunchEnvError(f"host list {hostlist!r} is empty")
    head, others = nodes[0], nodes[1:]
    head_addrs = list(resolve(head))
    routable = [a for a in head_addrs if not _is_loopback(a)]
    if routable:
        return routable[0]
    other_addrs = {node: [a for a in resolve(node) if not _is_loopback(a)] for node in others}
    if this_node == head:
        for node, addrs in other_addrs.items():
            for addr in addrs:
                local = route_from_here(addr)
                if local and not _is_loopback(local):
                    return local
    if head_addrs and not any(other_addrs.values()):
        return head_addrs[0]
    seen = ", ".join(head_addrs) if head_addrs else "nothing"
    raise LaunchEnvError(f"the first node {head!r} of {hostlist!r} resolves to {seen} here, which the other nodes "
                         "cannot reach: set HEAD_ADDR to its address on the cluster network")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m effdist.runtime.launch_env rendezvous-host NODELIST``: print the rendezvous host."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "rendezvous-host":
        print("usage: python -m effdist.runtime.launch_env rendezvous-host NODELIST", file=sys.stderr)
        return 2
    try:
        addr = rendezvous_host(args[1], this_node=os.environ.get("SLURMD_NODENAME"))
    except LaunchEnvError as e:
        print(f"effdist: {e}", file=sys.stderr)
        return 1
    print(f"[{addr}]" if ":" in addr else addr)  # torchrun reads host:port, so an IPv6 address gets brackets
    return 0


if __name__ == "__main__":
    sys.exit(main())
