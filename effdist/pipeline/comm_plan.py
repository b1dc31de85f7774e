"""What crosses the pipeline's chunk boundaries and in which order each rank posts it: `Message` and `CommPlan`
(why this order cannot deadlock: p2p.py, "Posting order"). No torch here: the planner's time model
(executor_time.py) reads the plan without importing torch; p2p.StepTransfers posts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from effdist.pipeline.ir import F, Action, Schedule
from effdist.pipeline.simulate import simulate

ACTIVATION, GRADIENT = "activation", "gradient"
_MAX_ELEMENTS = 64  # tensors per message; part of the gloo tag layout


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
