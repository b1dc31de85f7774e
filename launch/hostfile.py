"""DeepSpeed-style hostfiles -> one torchrun command line per host.

A hostfile lists one host per line with its GPU count; ``#`` starts a comment::

    worker-1 slots=8
    worker-2 slots=8   # a comment

    python launch/hostfile.py HOSTFILE --config configs/llama-1b.yaml [--set k=v ...] [--port 29500] [--ssh]

prints, for each host in order, the torchrun command to start there, with the environment effdist
wants on GPUs (CUDA_DEVICE_MAX_CONNECTIONS=1, NCCL_NVLS_ENABLE=0) in front (with ``--ssh``: wrapped in
``ssh HOST 'cd DIR && ...'``, ready for pdsh or a loop). The first host is the rendezvous master and
runs global rank 0 (static rendezvous with ``--node_rank``, so rank 0's place is predictable).
Hosts may have different slot counts.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path


class HostfileError(ValueError):
    """A hostfile line cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Host:
    name: str
    slots: int


_LINE = re.compile(r"^(?P<host>[^\s=]+)\s+slots\s*=\s*(?P<slots>\S+)$")


def parse_hostfile(text: str, source: str = "hostfile") -> list[Host]:
    """Hosts in file order; errors name ``source:line``. Duplicate hosts are an error (DeepSpeed's rule)."""
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if not m:
            raise HostfileError(f"{source}:{lineno}: {raw.strip()!r}: expected 'HOSTNAME slots=N'")
        name, slots_text = m.group("host"), m.group("slots")
        if not slots_text.isdigit() or int(slots_text) < 1:
            raise HostfileError(f"{source}:{lineno}: slots={slots_text!r} for {name}: expected a positive integer")
        if name in seen:
            raise HostfileError(f"{source}:{lineno}: host {name} is listed twice (first on line {seen[name]})")
        seen[name] = lineno
        hosts.append(Host(name, int(slots_text)))
    if not hosts:
        raise HostfileError(f"{source}: no hosts (expected lines like 'worker-1 slots=8')")
    return hosts


def torchrun_commands(hosts: list[Host], train_args: list[str], master_port: int = 29500,
                      launcher: list[str] | None = None) -> list[list[str]]:
    """argv of the command to run on each host, in the order of `hosts`."""
    if not 1 <= master_port <= 65535:
        raise ValueError(f"master_port={master_port} is not a TCP port (1..65535)")
    launcher = launcher or ["torchrun"]
    master = hosts[0].name
    return [[*launcher, f"--nnodes={len(hosts)}", f"--node_rank={i}", f"--nproc_per_node={h.slots}",
             f"--master_addr={master}", f"--master_port={master_port}", "-m", "effdist.train", *train_args]
            for i, h in enumerate(hosts)]


def ssh_command(host: str, workdir: str, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    remote = f"cd {shlex.quote(workdir)} && " + (f"{exports} " if exports else "") + shlex.join(argv)
    return ["ssh", host, remote]


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/hostfile.py",
                                description="Print the torchrun command of each host of a DeepSpeed-style hostfile.")
    p.add_argument("hostfile", type=Path)
    p.add_argument("--config", required=True, help="effdist config YAML (path as seen on the hosts)")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", default=None, help="passed to effdist train (default: its own, auto)")
    p.add_argument("--port", type=int, default=29500, help="rendezvous port on the first host (default 29500)")
    p.add_argument("--launcher", default="torchrun",
                   help="launcher command (default: torchrun; 'python launch/torchrun.py' keeps exit code 75)")
    p.add_argument("--ssh", action="store_true", help="wrap each command in ssh HOST 'cd WORKDIR && ...'")
    p.add_argument("--workdir", default=None, help="directory to cd into on each host (default: this one)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        hosts = parse_hostfile(args.hostfile.read_text(), source=str(args.hostfile))
    except OSError as e:
        print(f"hostfile: cannot read {args.hostfile}: {e.strerror}", file=sys.stderr)
        return 2
    except HostfileError as e:
        print(f"hostfile: {e}", file=sys.stderr)
        return 2
    train_args = ["--config", args.config]
    if args.run_dir:
        train_args += ["--run-dir", args.run_dir]
    if args.resume:
        train_args += ["--resume", args.resume]
    for o in args.overrides:
        train_args += ["--set", o]
    commands = torchrun_commands(hosts, train_args, master_port=args.port, launcher=shlex.split(args.launcher))
    workdir = args.workdir or str(Path.cwd())
    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_NVLS_ENABLE": "0"}
    for host, cmd in zip(hosts, commands):
        if args.ssh:
            print(shlex.join(ssh_command(host.name, workdir, cmd, env)))
        else:
            print(f"# {host.name} ({host.slots} processes)")
            print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(cmd))
    total = sum(h.slots for h in hosts)
    print(f"# {len(hosts)} hosts, {total} processes; master {hosts[0].name}:{args.port}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
