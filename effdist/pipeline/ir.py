"""The pipeline-schedule IR shared by the schedule generators, the simulator and the executor.

Vocabulary
----------
* A **chunk** is a contiguous slice of the model's layers. Chunk ``c`` is the c-th slice in forward order:
  chunk 0 holds the embedding, chunk ``num_chunks - 1`` holds the output layer and the loss.
* A **placement** says which pipeline rank holds each chunk (1 chunk per rank, v interleaved chunks per rank,
  or the V shape where rank r holds chunks r and 2p-1-r).
* An **action** is one unit of work on one rank: ``F`` (forward of a chunk for one microbatch), ``B`` (backward
  to the chunk's *input* only), ``W`` (the deferred weight-gradient part of that backward) or ``BW`` (the whole
  backward at once). A (chunk, microbatch) has exactly one F and either one B plus one W, or one BW.
* A **schedule** is the ordered action list of every rank plus the placement. The order is the whole contract:
  a rank runs its list front to back, waiting for inputs that come from other ranks.

Data dependencies (the only ones; everything else is the per-rank order):
  F(c, m)  needs F(c-1, m)                      (the activation of the previous chunk)
  B(c, m)  needs B(c+1, m) or BW(c+1, m)        (the gradient w.r.t. chunk c's output)
           or, for the last chunk, F(c, m)      (the loss)
  W(c, m)  needs B(c, m)                        (same rank, same chunk)

torch.distributed.pipelining writes actions as ``"{stage}{type}{microbatch}"``, e.g. ``0F1``; its stage index is
our chunk index, its ``I`` (backward-input) is our ``B`` and its ``B`` (full backward) is our ``BW``. Import and
export of that form, and of its CSV dump (one row per rank), live here so that schedules can be compared.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable, Mapping, Sequence


class ScheduleError(ValueError):
    """A schedule (or placement) is malformed. The message names the first violation found."""


class ActionKind(str, Enum):
    FORWARD = "F"
    BACKWARD_INPUT = "B"
    BACKWARD_WEIGHT = "W"
    BACKWARD = "BW"

    def __str__(self) -> str:  # "F", not "ActionKind.FORWARD", in messages
        return self.value


F = ActionKind.FORWARD
B = ActionKind.BACKWARD_INPUT
W = ActionKind.BACKWARD_WEIGHT
BW = ActionKind.BACKWARD

_TO_TORCH = {F: "F", B: "I", W: "W", BW: "B"}
_FROM_TORCH = {v: k for k, v in _TO_TORCH.items()}
_TORCH_ACTION = re.compile(r"^\s*(\d+)(F|I|W|B)(\d+)\s*$")
_OWN_ACTION = re.compile(r"^\s*(\d+)(BW|F|B|W)(\d+)\s*$")


@dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    chunk: int
    microbatch: int

    def __str__(self) -> str:
        return f"{self.chunk}{self.kind.value}{self.microbatch}"

    def to_torch(self) -> str:
        """The action in torch.distributed.pipelining notation (I = our B, B = our BW)."""
        return f"{self.chunk}{_TO_TORCH[self.kind]}{self.microbatch}"

    @staticmethod
    def from_torch(text: str) -> "Action":
        match = _TORCH_ACTION.match(text)
        if not match:
            raise ScheduleError(
                f"cannot read torch action {text!r}: expected <stage><F|I|W|B><microbatch>, e.g. 0F1 or 2I0 "
                "(communication and resharding actions are not part of a compute schedule)")
        stage, kind, mb = match.groups()
        return Action(_FROM_TORCH[kind], int(stage), int(mb))

    @staticmethod
    def parse(text: str) -> "Action":
        """Read our own notation, e.g. ``3F1``, ``3B1``, ``3W1``, ``3BW1`` (what ``str(action)`` writes)."""
        match = _OWN_ACTION.match(text)
        if not match:
            raise ScheduleError(f"cannot read action {text!r}: expected <chunk><F|B|W|BW><microbatch>, e.g. 2BW0")
        chunk, kind, mb = match.groups()
        return Action(ActionKind(kind), int(chunk), int(mb))


# ----------------------------------------------------------------------------------------------- placement

@dataclass(frozen=True)
class Placement:
    """Which rank holds each chunk. ``rank_of_chunk[c]`` is the rank of chunk c."""

    pp: int
    rank_of_chunk: tuple[int, ...]
    style: str = "custom"

    def __post_init__(self) -> None:
        if self.pp < 1:
            raise ScheduleError(f"placement pp = {self.pp}: needs at least one rank")
        bad = [r for r in self.rank_of_chunk if not 0 <= r < self.pp]
        if bad:
            raise ScheduleError(f"placement puts a chunk on rank {bad[0]}, outside 0..{self.pp - 1}")
        empty = [r for r in range(self.pp) if r not in self.rank_of_chunk]
        if empty:
            raise ScheduleError(f"placement leaves rank {empty[0]} without a chunk; every rank needs one")

    @classmethod
    def plain(cls, pp: int) -> "Placement":
        """One chunk per rank: chunk r on rank r (1F1B, ZB-H1)."""
        return cls(pp, tuple(range(pp)), "plain")

    @classmethod
    def interleaved(cls, pp: int, chunks_per_rank: int) -> "Placement":
        """Megatron's interleaving ("loop" in torch): chunk c on rank c % pp."""
        if chunks_per_rank < 1:
            raise ScheduleError(f"chunks_per_rank = {chunks_per_rank}: must be >= 1")
        return cls(pp, tuple(c % pp for c in range(pp * chunks_per_rank)), "interleaved" if chunks_per_rank > 1 else "plain")

    @classmethod
    def v_shape(cls, pp: int) -> "Placement":
        """2p chunks; rank r holds chunks r and 2p-1-r, so the forward goes down the ranks and back up."""
        return cls(pp, tuple(c if c < pp else 2 * pp - 1 - c for c in range(2 * pp)), "v")

    @property
    def num_chunks(self) -> int:
        return len(self.rank_of_chunk)

    def rank_of(self, chunk: int) -> int:
        if not 0 <= chunk < self.num_chunks:
            raise ScheduleError(f"chunk {chunk} does not exist; chunks are 0..{self.num_chunks - 1}")
        return self.rank_of_chunk[chunk]

    def chunks_of(self, rank: int) -> tuple[int, ...]:
        """The chunks a rank holds, in forward order."""
        if not 0 <= rank < self.pp:
            raise ScheduleError(f"rank {rank} does not exist; ranks are 0..{self.pp - 1}")
        return tuple(c for c, r in enumerate(self.rank_of_chunk) if r == rank)

    def chunk_fraction(self) -> float:
        """Size of one chunk relative to one 1F1B stage (1/num_chunks of the model vs 1/pp): pp / num_chunks."""
        return self.pp / self.num_chunks

    @classmethod
    def infer(cls, pp: int, rank_of_chunk: Sequence[int]) -> "Placement":
        """Name the style of an observed chunk->rank map (what an imported schedule used)."""
        mapping = tuple(rank_of_chunk)
        for candidate in (cls.plain(pp), cls.v_shape(pp)):
            if candidate.rank_of_chunk == mapping:
                return candidate
        if len(mapping) % pp == 0 and mapping == cls.interleaved(pp, len(mapping) // pp).rank_of_chunk:
            return cls.interleaved(pp, len(mapping) // pp)
        return cls(pp, mapping, "custom")


# ------------------------------------------------------------------------------------------------ schedule

@dataclass(frozen=True)
class Peer:
    """Where a tensor goes to (or comes from): the chunk on the other side and the rank holding it."""

    chunk: int
    rank: int


@dataclass
class Schedule:
    """Per-rank ordered action lists plus the chunk placement.

    The executor walks ``actions[rank]`` front to back; the simulator predicts the same walk.
    """

    placement: Placement
    num_microbatches: int
    actions: list[list[Action]]
    name: str = "custom"
    # Free-form facts about how the schedule was built (generator parameters); not part of the contract.
    info: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ shape
    @property
    def pp(self) -> int:
        return self.placement.pp

    @property
    def num_chunks(self) -> int:
        return self.placement.num_chunks

    def chunks_of(self, rank: int) -> tuple[int, ...]:
        return self.placement.chunks_of(rank)

    def rank_of(self, chunk: int) -> int:
        return self.placement.rank_of(chunk)

    @property
    def splits_backward(self) -> bool:
        """True when backwards are split into B and W (zero-bubble family), False when they are fused BW."""
        return any(a.kind in (B, W) for rank in self.actions for a in rank)

    def __len__(self) -> int:
        return sum(len(a) for a in self.actions)

    # ------------------------------------------------------------------ communication peers
    def forward_recipient(self, chunk: int) -> Peer | None:
        """Who receives the output of F(chunk): chunk+1 and its rank; None for the last chunk (the loss)."""
        self.placement.rank_of(chunk)
        return None if chunk == self.num_chunks - 1 else Peer(chunk + 1, self.rank_of(chunk + 1))

    def forward_source(self, chunk: int) -> Peer | None:
        """Who sends the input of F(chunk): chunk-1 and its rank; None for chunk 0 (reads the data)."""
        self.placement.rank_of(chunk)
        return None if chunk == 0 else Peer(chunk - 1, self.rank_of(chunk - 1))

    def grad_recipient(self, chunk: int) -> Peer | None:
        """Who receives the input gradient produced by B/BW(chunk): chunk-1 and its rank; None for chunk 0."""
        return self.forward_source(chunk)

    def grad_source(self, chunk: int) -> Peer | None:
        """Who sends the output gradient B/BW(chunk) needs: chunk+1 and its rank; None for the last chunk."""
        return self.forward_recipient(chunk)

    def is_local(self, a: int, b: int) -> bool:
        """Chunks a and b sit on the same rank (V shape at the turn): hand tensors over without P2P."""
        return self.rank_of(a) == self.rank_of(b)

    # ------------------------------------------------------------------ dependencies
    def backward_kind(self) -> dict[tuple[int, int], ActionKind]:
        """For each (chunk, microbatch): BW if it uses a fused backward, else B."""
        kinds: dict[tuple[int, int], ActionKind] = {}
        for rank_actions in self.actions:
            for a in rank_actions:
                if a.kind in (B, BW):
                    kinds[(a.chunk, a.microbatch)] = a.kind
        return kinds

    def producers(self, action: Action, backward_kind: Mapping[tuple[int, int], ActionKind] | None = None) -> list[Action]:
        """The actions whose results `action` consumes (see the module docstring)."""
        c, m = action.chunk, action.microbatch
        if action.kind is F:
            return [] if c == 0 else [Action(F, c - 1, m)]
        if action.kind is W:
            return [Action(B, c, m)]
        if c == self.num_chunks - 1:
            return [Action(F, c, m)]
        kinds = backward_kind if backward_kind is not None else self.backward_kind()
        return [Action(kinds.get((c + 1, m), B), c + 1, m)]

    # ------------------------------------------------------------------ validation
    def validate(self) -> "Schedule":
        """Raise ScheduleError naming the first violation; return self when the schedule is runnable."""
        if self.num_microbatches < 1:
            raise ScheduleError(f"num_microbatches = {self.num_microbatches}: must be >= 1")
        if len(self.actions) != self.pp:
            raise ScheduleError(f"schedule has action lists for {len(self.actions)} ranks but the placement has pp = {self.pp}")
        seen: dict[Action, tuple[int, int]] = {}
        for rank, rank_actions in enumerate(self.actions):
            for pos, a in enumerate(rank_actions):
                if not isinstance(a, Action):
                    raise ScheduleError(f"rank {rank} position {pos}: {a!r} is not an Action")
                if not 0 <= a.chunk < self.num_chunks:
                    raise ScheduleError(f"rank {rank} position {pos}: {a} names chunk {a.chunk}; chunks are 0..{self.num_chunks - 1}")
                if not 0 <= a.microbatch < self.num_microbatches:
                    raise ScheduleError(f"rank {rank} position {pos}: {a} names microbatch {a.microbatch}; "
                                        f"microbatches are 0..{self.num_microbatches - 1}")
                owner = self.rank_of(a.chunk)
                if owner != rank:
                    raise ScheduleError(f"rank {rank} position {pos}: {a} runs chunk {a.chunk}, which lives on rank {owner}")
                if a in seen:
                    r0, p0 = seen[a]
                    raise ScheduleError(f"{a} appears twice: rank {r0} position {p0} and rank {rank} position {pos}")
                seen[a] = (rank, pos)
        for c in range(self.num_chunks):
            for m in range(self.num_microbatches):
                where = f"chunk {c} microbatch {m} (rank {self.rank_of(c)})"
                if Action(F, c, m) not in seen:
                    raise ScheduleError(f"{where} has no forward {Action(F, c, m)}")
                has_b, has_w, has_bw = (Action(k, c, m) in seen for k in (B, W, BW))
                if has_bw and (has_b or has_w):
                    raise ScheduleError(f"{where} has a fused backward {Action(BW, c, m)} and also a split B/W; use one or the other")
                if not has_bw and not (has_b and has_w):
                    missing = "a backward (B+W or BW)" if not has_b and not has_w else (
                        f"its weight gradient {Action(W, c, m)}" if has_b else f"its input gradient {Action(B, c, m)}")
                    raise ScheduleError(f"{where} is missing {missing}")
        self._check_runnable()
        return self

    def _check_runnable(self) -> None:
        """Walk every rank's list as the executor would; report a deadlock by the first stuck rank."""
        kinds = self.backward_kind()
        done: set[Action] = set()
        heads = [0] * self.pp
        remaining = len(self)
        while remaining:
            progressed = False
            for rank, rank_actions in enumerate(self.actions):
                while heads[rank] < len(rank_actions):
                    a = rank_actions[heads[rank]]
                    if any(p not in done for p in self.producers(a, kinds)):
                        break
                    done.add(a)
                    heads[rank] += 1
                    remaining -= 1
                    progressed = True
            if not progressed:
                raise ScheduleError(self._describe_deadlock(heads, kinds, done))

    def _describe_deadlock(self, heads: list[int], kinds, done: set[Action]) -> str:
        """Name the root cause: an action placed before its own producer on the same rank, or else the cycle of
        ranks each waiting at its head for a result another one has not produced yet."""
        positions = {a: (r, i) for r, acts in enumerate(self.actions) for i, a in enumerate(acts)}

        def blocker(rank: int) -> Action:
            head = self.actions[rank][heads[rank]]
            return next(p for p in self.producers(head, kinds) if p not in done)

        stuck = [r for r in range(self.pp) if heads[r] < len(self.actions[r])]
        for rank in stuck:
            waiting = blocker(rank)
            if positions[waiting][0] == rank:
                return (f"deadlock: rank {rank} position {heads[rank]} runs {self.actions[rank][heads[rank]]} before the "
                        f"{waiting} it needs (same rank, position {positions[waiting][1]}); move {waiting} earlier")
        chain, rank = [], stuck[0]
        while rank not in chain:  # every stuck rank waits on another stuck rank, so this walk closes a cycle
            chain.append(rank)
            rank = positions[blocker(rank)][0]
        cycle = chain[chain.index(rank):]
        steps = [f"rank {r} is stuck at position {heads[r]} ({self.actions[r][heads[r]]}) waiting for {blocker(r)} "
                 f"(rank {positions[blocker(r)][0]} position {positions[blocker(r)][1]})" for r in cycle]
        return "deadlock: " + "; ".join(steps) + "; no rank in this cycle can proceed"

    # ------------------------------------------------------------------ torch.distributed.pipelining form
    def to_torch_order(self) -> dict[int, list[str]]:
        """``{rank: ["0F0", "0F1", "0I0", "0W0", ...]}`` as torch.distributed.pipelining writes pipeline_order
        (compute actions only, no idle slots)."""
        return {rank: [a.to_torch() for a in acts] for rank, acts in enumerate(self.actions)}

    @classmethod
    def from_torch_order(cls, order: Mapping[int, Iterable[object]], num_microbatches: int | None = None,
                         placement: Placement | None = None, name: str = "imported") -> "Schedule":
        """Build a Schedule from torch's ``pipeline_order`` (values: `_Action`, action strings or None).

        Idle slots (None, empty strings) are dropped: our schedules carry order, not time slots. The placement is
        inferred from which rank runs which stage unless given. The result is validated.
        """
        pp = len(order)
        if sorted(order) != list(range(pp)):
            raise ScheduleError(f"torch order has ranks {sorted(order)}; expected 0..{pp - 1}")
        actions: list[list[Action]] = []
        stage_rank: dict[int, int] = {}
        for rank in range(pp):
            row: list[Action] = []
            for item in order[rank]:
                text = "" if item is None else str(item).strip()
                if not text:
                    continue
                a = Action.from_torch(text)
                if stage_rank.setdefault(a.chunk, rank) != rank:
                    raise ScheduleError(f"stage {a.chunk} appears on ranks {stage_rank[a.chunk]} and {rank}; "
                                        "a stage must live on one rank")
                row.append(a)
            actions.append(row)
        if placement is None:
            n_chunks = max(stage_rank) + 1 if stage_rank else 0
            missing = [c for c in range(n_chunks) if c not in stage_rank]
            if missing:
                raise ScheduleError(f"stage {missing[0]} never appears in the torch order, so its rank is unknown; pass placement=")
            placement = Placement.infer(pp, [stage_rank[c] for c in range(n_chunks)])
        if num_microbatches is None:
            num_microbatches = 1 + max((a.microbatch for row in actions for a in row), default=-1)
        return cls(placement, num_microbatches, actions, name=name).validate()

    def to_csv(self) -> str:
        """torch's compute-only CSV: one row per rank, one action string per cell."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        for row in self.to_torch_order().values():
            writer.writerow(row)
        return buf.getvalue()

    @classmethod
    def from_csv(cls, text: str, num_microbatches: int | None = None, placement: Placement | None = None,
                 name: str = "imported") -> "Schedule":
        rows = list(csv.reader(io.StringIO(text)))
        return cls.from_torch_order(dict(enumerate(rows)), num_microbatches, placement, name)

    # ------------------------------------------------------------------ readable form
    def describe(self) -> str:
        """One line per rank in our own notation, e.g. ``rank 0: 0F0 0F1 0B0 0W0 ...``."""
        return "\n".join(f"rank {r}: " + " ".join(str(a) for a in acts) for r, acts in enumerate(self.actions))
