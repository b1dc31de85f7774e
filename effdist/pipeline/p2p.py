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
from typing import Sequence

import torch
import torch.distributed as dist

# The plan (what is sent when) is torch-free so that the planner's time model can read it without importing torch.
from effdist.pipeline.comm_plan import ACTIVATION, GRADIENT, CommPlan, Message  # noqa: F401 - their home before
from effdist.protocols import TensorSpec  # the boundary interface's tensor description



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
