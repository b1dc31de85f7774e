"""Point-to-point traffic of a pipeline Schedule: what crosses each chunk boundary, and in which order it is posted.

What crosses a boundary. The output of chunk c (the input of chunk c+1) is a tuple of tensors: the hidden states
and any *extras* (EPAS: the anchor layer's packed Q/K). A `Signature` lists the shape and dtype of each element.
Going back, the gradient of every element that requires grad crosses the same boundary.

Posting order (why this cannot deadlock). NCCL matches sends and receives in the order they are posted and runs
the P2P operations of a process group on one stream, so the order matters; gloo matches by tag (each message
element has its own tag here), so for gloo any order works. `CommPlan` gives every message a global key: the
simulated end time of the action that produces it (`simulate`, unit costs), then the producing rank and its
position. Every rank posts its sends and receives in increasing key order: a send right after its producer ran,
the receives that come before the rank's next send as soon as everything before them is posted -- i.e. as early
as the order allows. All ranks thus post subsequences of one global order that a valid (simulated) execution
follows, so the k-th operation of each pair, and of each rank's stream, can always complete. Posting never
blocks; a receive is waited for just before the action that consumes it, sends only at the end of the step.

Errors. Waits carry the process group timeout (gloo; NCCL's watchdog aborts on its own timeout) and turn failures
into a `PipelineCommError` that names the message, the peer and the likely cause.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist

from effdist.pipeline.ir import F, Action, Schedule
from effdist.pipeline.simulate import simulate
from effdist.protocols import TensorSpec  # the boundary interface's tensor description

ACTIVATION, GRADIENT = "activation", "gradient"
_MAX_ELEMENTS = 64  # tensors per message; part of the gloo tag layout


class PipelineCommError(RuntimeError):
    """A pipeline P2P transfer failed or timed out, or the ranks disagree about what crosses a boundary."""


Signature = tuple[TensorSpec, ...]


def describe_signature(sig: Signature) -> str:
    return "(" + ", ".join(s.describe() for s in sig) + ")"


def check_tensors(tensors: Sequence[torch.Tensor], sig: Signature, what: str) -> None:
    """Raise PipelineCommError when `tensors` do not match `sig` (count, shape, dtype)."""
    got = tuple(TensorSpec(tuple(t.shape), t.dtype) for t in tensors)
    if len(got) != len(sig) or any(g.shape != s.shape or g.dtype != s.dtype for g, s in zip(got, sig)):
        raise PipelineCommError(f"{what}: produced {describe_signature(got)} but the boundary signature is "
                                f"{describe_signature(sig)}; the chunk's outputs (hidden states + extras) must match the "
                                "signature declared for this step (see Pipeline.set_boundary_extras)")


@dataclass(frozen=True)
class Message:
    """One transfer between ranks: the activation or the gradient crossing boundary c -> c+1 for a microbatch."""

    direction: str  # ACTIVATION (chunk c -> chunk c+1) or GRADIENT (chunk c+1 -> chunk c)
    boundary: int
    microbatch: int
    src: int  # pipeline ranks
    dst: int

    def describe(self) -> str:
        if self.direction == ACTIVATION:
            return (f"the activation of chunk {self.boundary} microbatch {self.microbatch} "
                    f"(pipeline rank {self.src} -> {self.dst})")
        return (f"the gradient for chunk {self.boundary} microbatch {self.microbatch} from chunk {self.boundary + 1} "
                f"(pipeline rank {self.src} -> {self.dst})")

    def tag(self, num_boundaries: int, element: int) -> int:
        kind = 0 if self.direction == ACTIVATION else 1
        return ((self.microbatch * max(1, num_boundaries) + self.boundary) * 2 + kind) * _MAX_ELEMENTS + element


@dataclass
class CommPlan:
    """This rank's sends and receives in posting order, and which action produces or consumes each."""

    rank: int
    posts: list[tuple[str, Message]]  # ("send" | "recv", message), in global key order
    sends_of: dict[Action, list[Message]] = field(default_factory=dict)  # producer action -> its outgoing messages
    recv_for: dict[Action, Message] = field(default_factory=dict)  # consumer action -> its incoming message

    @classmethod
    def build(cls, schedule: Schedule, rank: int) -> "CommPlan":
        return cls.build_all(schedule)[rank]

    @classmethod
    def build_all(cls, schedule: Schedule) -> list["CommPlan"]:
        """Every rank's plan from one simulation (the planner's time model needs all of them at once)."""
        timings = simulate(schedule).timings
        where: dict[Action, tuple[float, int, int]] = {}
        for r, row in enumerate(timings):
            for pos, t in enumerate(row):
                where[t.action] = (t.end, r, pos)
        kinds = schedule.backward_kind()
        last = schedule.num_chunks - 1
        keyed: list[tuple[tuple, Message, Action, Action]] = []
        for c in range(last):
            src, dst = schedule.rank_of(c), schedule.rank_of(c + 1)
            if src == dst:
                continue  # same rank (V turn): handed over without P2P
            for m in range(schedule.num_microbatches):
                fwd, nxt = Action(F, c, m), Action(F, c + 1, m)
                keyed.append((where[fwd] + (0,), Message(ACTIVATION, c, m, src, dst), fwd, nxt))
                producer = Action(kinds[(c + 1, m)], c + 1, m)
                consumer = Action(kinds[(c, m)], c, m)
                keyed.append((where[producer] + (1,), Message(GRADIENT, c, m, dst, src), producer, consumer))
        keyed.sort(key=lambda k: k[0])
        plans = [cls(rank, []) for rank in range(schedule.pp)]
        for _, msg, producer, consumer in keyed:
            sender, receiver = plans[msg.src], plans[msg.dst]
            sender.posts.append(("send", msg))
            sender.sends_of.setdefault(producer, []).append(msg)
            receiver.posts.append(("recv", msg))
            receiver.recv_for[consumer] = msg
        return plans


class StepTransfers:
    """The P2P state of one step on one rank: posts the plan's operations and hands out received tensors."""

    def __init__(self, plan: CommPlan, signatures: Sequence[Signature], group, global_ranks: Sequence[int],
                 device: torch.device, timeout_s: float):
        self.plan = plan
        self.signatures = signatures
        self.group = group
        self.global_ranks = list(global_ranks)
        self.device = device
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        self._next = 0
        self._ready: dict[Message, tuple[torch.Tensor, ...]] = {}
        self._recv: dict[Message, tuple[tuple[torch.Tensor, ...], list]] = {}
        self._sends: dict[Message, tuple[tuple[torch.Tensor, ...], list]] = {}
        self._blocking_waits = device.type != "cuda"

    def elements(self, msg: Message) -> Signature:
        sig = self.signatures[msg.boundary]
        return sig if msg.direction == ACTIVATION else tuple(s for s in sig if s.requires_grad)

    # ------------------------------------------------------------------ posting
    def ready(self, msg: Message, tensors: Sequence[torch.Tensor]) -> None:
        """The producer of `msg` ran; its tensors may be sent once everything before them is posted."""
        # Detached: a pending send must keep the data, not the producer's autograd graph (and through it the
        # chunk's input) alive.
        self._ready[msg] = tuple(t.detach().contiguous() for t in tensors)

    def advance(self) -> None:
        """Post, in plan order, every operation that can be posted now."""
        ops: list[dist.P2POp] = []
        owners: list[tuple[Message, str]] = []
        num_boundaries = len(self.signatures)
        while self._next < len(self.plan.posts):
            op, msg = self.plan.posts[self._next]
            if op == "send":
                if msg not in self._ready:
                    break
                tensors = self._ready.pop(msg)
                peer = self.global_ranks[msg.dst]
                for i, t in enumerate(tensors):
                    ops.append(dist.P2POp(dist.isend, t, peer, self.group, msg.tag(num_boundaries, i)))
                    owners.append((msg, "send"))
                self._sends[msg] = (tensors, [])
            else:
                peer = self.global_ranks[msg.src]
                buffers = tuple(torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in self.elements(msg))
                for i, t in enumerate(buffers):
                    ops.append(dist.P2POp(dist.irecv, t, peer, self.group, msg.tag(num_boundaries, i)))
                    owners.append((msg, "recv"))
                self._recv[msg] = (buffers, [])
            self._next += 1
        if not ops:
            return
        try:
            works = dist.batch_isend_irecv(ops)
        except Exception as e:  # noqa: BLE001 - re-raised with the context a user needs
            peers = sorted({op.peer for op in ops})
            raise PipelineCommError(
                f"pipeline rank {self.plan.rank}: posting {len(ops)} P2P operations (with global rank(s) "
                f"{', '.join(map(str, peers))}) failed: {e}. The peer process probably died or raised an error (see "
                "its log).") from e
        if len(works) == len(ops):
            for (msg, kind), work in zip(owners, works):
                (self._sends if kind == "send" else self._recv)[msg][1].append(work)
        else:
            # NCCL coalesces a batch into one operation (one work for all): every message of it waits on that.
            for msg, kind in dict.fromkeys(owners):
                (self._sends if kind == "send" else self._recv)[msg][1].extend(works)

    # ------------------------------------------------------------------ waiting
    def take(self, msg: Message) -> tuple[torch.Tensor, ...]:
        """The received tensors of `msg`, waiting for them if needed (posts whatever is due first)."""
        self.advance()
        if msg not in self._recv:
            raise PipelineCommError(f"pipeline rank {self.plan.rank}: {msg.describe()} is needed but its receive was "
                                    "never posted; the plan and the action order disagree (a bug in the executor)")
        buffers, works = self._recv.pop(msg)
        for work in works:
            self._wait(work, msg, self.global_ranks[msg.src])
        return buffers

    def _wait(self, work, msg: Message, peer: int) -> None:
        try:
            if self._blocking_waits:
                work.wait(self.timeout)
            else:
                work.wait()  # stream-ordered on CUDA; NCCL's watchdog enforces the group timeout
        except Exception as e:  # noqa: BLE001
            raise PipelineCommError(
                f"pipeline rank {self.plan.rank}: waiting for {msg.describe()} (global rank {peer}) failed: {e}. "
                f"The peer process probably died or raised an error (see its log), or it did not reach this transfer "
                f"within parallel.timeout_s = {self.timeout_s:g} s.") from e

    def completed_sends(self) -> list[Message]:
        """Messages whose sends have all completed (their tensors may be released); forgets them."""
        done = [m for m, (_, works) in self._sends.items() if all(w.is_completed() for w in works)]
        for m in done:
            works = self._sends.pop(m)[1]
            for w in works:
                self._wait(w, m, self.global_ranks[m.dst])
        return done

    def finish(self) -> None:
        """End of step: everything must have been posted and received; wait for the sends."""
        self.advance()
        if self._next != len(self.plan.posts):
            op, msg = self.plan.posts[self._next]
            raise PipelineCommError(f"pipeline rank {self.plan.rank}: the step ended before {op} of {msg.describe()} "
                                    "could be posted (its producer never ran)")
        if self._recv:
            msg = next(iter(self._recv))
            raise PipelineCommError(f"pipeline rank {self.plan.rank}: {msg.describe()} was received but never used")
        for msg, (_, works) in list(self._sends.items()):
            for w in works:
                self._wait(w, msg, self.global_ranks[msg.dst])
        self._sends.clear()

    def abandon(self) -> None:
        """Drop every reference after a failed step (outstanding operations are left to the process group)."""
        self._ready.clear()
        self._recv.clear()
        self._sends.clear()
