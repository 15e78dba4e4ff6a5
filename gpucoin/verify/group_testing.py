"""Group testing: which node of a void interval fed another gradient into the all-reduce.

A rank that commits the sketch of its honest gradient but feeds another one into the reduction
(``runtime.cheats.honest_commitment_other_gradient``) makes every rank diverge from the replay at
the next step: the sum hides who did it, the interval is void and its evidence names nobody
(``docs/verification.md``, Blame). Its W nodes are the suspects. Each test re-runs the interval on
a group of W nodes: some suspects and, filling the group, nodes that are not suspects
(``fillers``). A group whose re-run replays clean clears every suspect in it; a group that diverges
again keeps its suspects under suspicion. Round by round the uncleared suspects are split across
as many groups as the free nodes allow (``plan_round``; with room for one group only, half of
them are tested); once a suspect sits alone among fillers, every further diverging group of its
own confirms it. A suspect is **named** when its newest ``confirmations`` groups all
diverged, it alone among fillers in each, and those fillers were all different nodes (a suspect
never sits alone with the same filler twice, so one cheating filler cannot frame it twice; ``record``
refuses a round that would). A named node is excluded from the market, never slashed: the evidence
is statistical.

False accusation: an honest suspect is named only if each of its ``confirmations`` solo groups
diverged because a filler cheated. If a fraction ``q`` of the market's nodes cheat this way,
the W - 1 fresh fillers of one group hold a cheater with probability 1 - (1 - q)^(W - 1), so
the probability is at most (1 - (1 - q)^(W - 1))^confirmations (``false_accusation_bound``):
with W = 2, q = 5 % and 2 confirmations, 0.25 %; with 3, 0.0125 %.

A cheater that trains honestly while tested is cleared and never named: the re-runs then pass
and the job goes on, which is what the test is for; a cheater that goes on cheating is named
within ``max_rounds`` (``rounds_needed``), and a test that reaches it without naming anyone ends
unresolved. Pure: no Ray, no I/O; the head keeps the state and runs the groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum


class GroupOutcome(str, Enum):
    """What the re-run of one group showed: its replay diverged again (void) or passed."""

    DIVERGED = "diverged"
    CLEAN = "clean"


@dataclass(frozen=True)
class Group:
    """One re-run of the void interval: ``suspects`` + ``fillers`` are its W nodes, in rank order
    suspects first."""

    suspects: tuple[str, ...]
    fillers: tuple[str, ...]

    @property
    def nodes(self) -> tuple[str, ...]:
        """The group's nodes, rank 0 first."""
        return self.suspects + self.fillers


@dataclass(frozen=True)
class GroupTest:
    """The state of one void interval's group test.

    Attributes:
        suspects: the void interval's nodes (W of them, W >= 2), rank order.
        confirmations: solo diverging groups, each with other fillers, that name a suspect.
        max_rounds: rounds after which an unresolved test ends (at least ``rounds_needed``).
        history: each round's groups and what their re-runs showed, oldest first.
    """

    suspects: tuple[str, ...]
    confirmations: int = 2
    max_rounds: int = 0
    history: tuple[tuple[tuple[Group, GroupOutcome], ...], ...] = field(default=())

    def __post_init__(self) -> None:
        w = len(self.suspects)
        if w < 2 or len(set(self.suspects)) != w:
            raise ValueError(f"a group test needs 2 or more distinct suspects, got {list(self.suspects)}")
        if self.confirmations < 1:
            raise ValueError(f"confirmations must be at least 1, got {self.confirmations}")
        need = rounds_needed(w, self.confirmations)
        if self.max_rounds == 0:
            object.__setattr__(self, "max_rounds", need)
        elif self.max_rounds < need:
            raise ValueError(f"max_rounds {self.max_rounds} is below the {need} rounds {w} suspects need")

    @property
    def world(self) -> int:
        """W: nodes per group, the job's ranks."""
        return len(self.suspects)

    def cleared(self) -> frozenset[str]:
        """Suspects that sat in a group whose re-run passed."""
        return frozenset(s for rnd in self.history for g, out in rnd if out == GroupOutcome.CLEAN for s in g.suspects)

    def remaining(self) -> tuple[str, ...]:
        """Suspects not cleared, in their rank order."""
        gone = self.cleared()
        return tuple(s for s in self.suspects if s not in gone)

    def focus(self) -> tuple[str, ...]:
        """The suspects the next round splits: the uncleared ones of the newest diverging group
        (the smallest of its round), or every uncleared suspect if none is left there."""
        left = self.remaining()
        for rnd in reversed(self.history):
            diverged = sorted((g for g, out in rnd if out == GroupOutcome.DIVERGED), key=lambda g: len(g.suspects))
            for g in diverged:
                mine = tuple(s for s in left if s in g.suspects)
                if mine:
                    return mine
        return left

    def named(self) -> str | None:
        """The suspect the rule names (module docstring), or None."""
        for s in self.remaining():
            solo = [out for rnd in self.history for g, out in rnd if g.suspects == (s,)]
            if len(solo) >= self.confirmations and all(o == GroupOutcome.DIVERGED for o in solo[-self.confirmations :]):
                return s
        return None

    def done(self) -> bool:
        """Named, cleared of every suspect, or out of rounds."""
        return self.named() is not None or not self.remaining() or len(self.history) >= self.max_rounds

    def met(self, suspect: str) -> frozenset[str]:
        """Fillers ``suspect`` sat alone with in any round (its solo groups take others)."""
        return frozenset(f for rnd in self.history for g, _ in rnd if g.suspects == (suspect,) for f in g.fillers)


def rounds_needed(world: int, confirmations: int) -> int:
    """Rounds within which a cheater that goes on cheating among ``world`` suspects is named, even
    when only one group fits per round: each halving of the suspects takes at most two rounds (one
    half tested clean, then the other), ceil(log2 W) halvings leave it alone, and its first solo
    divergence is the first of its ``confirmations``."""
    return 2 * math.ceil(math.log2(world)) + confirmations - 1


def plan_round(test: GroupTest, free: Sequence[str]) -> list[Group]:
    """The next round's groups, filled from ``free`` (the free nodes the market admits, in the
    order fillers are taken: the head draws it with the job's secret; suspects among them are
    skipped).

    The suspects split are ``test.focus()``. Two or more groups if the fillers allow: every one of
    them in one group, split as evenly as possible in rank order (one group per suspect when
    there are fillers enough). Else one group: the first half (rounded up) of them. Each group is
    topped up to W nodes with fillers; a suspect alone with fillers it never sat alone with before.

    Returns:
        The groups (empty: the test is done, or too few fillers for even one group: wait for
        free nodes).
    """
    if test.done():
        return []
    w, left = test.world, list(test.focus())
    pool = [n for n in dict.fromkeys(free) if n not in test.suspects]

    def filled(parts: list[tuple[str, ...]]) -> list[Group] | None:
        groups, taken = [], set()
        for members in parts:
            met = test.met(members[0]) if len(members) == 1 else set()
            fill = [n for n in pool if n not in taken and n not in met][: w - len(members)]
            if len(fill) < w - len(members):
                return None
            taken.update(fill)
            groups.append(Group(members, tuple(fill)))
        return groups

    for k in range(len(left), 1, -1):
        sizes = [len(left) // k + (1 if i < len(left) % k else 0) for i in range(k)]
        bounds = [sum(sizes[:i]) for i in range(k + 1)]
        groups = filled([tuple(left[bounds[i] : bounds[i + 1]]) for i in range(k)])
        if groups is not None:
            return groups
    return filled([tuple(left[: (len(left) + 1) // 2])]) or []


def record(test: GroupTest, results: Sequence[tuple[Group, GroupOutcome]]) -> GroupTest:
    """``test`` after one round of re-runs.

    Raises:
        ValueError: a group that is not W distinct nodes, holds a cleared or unknown suspect or a
            suspect as a filler, puts a suspect alone with a filler it sat alone with before
            (``named`` counts on fresh fillers), or shares a node with another group of the round.
    """
    seen: set[str] = set()
    remaining = set(test.remaining())
    for g, out in results:
        if not isinstance(out, GroupOutcome):
            raise ValueError(f"outcome {out!r} is not a GroupOutcome")
        if len(g.nodes) != test.world or len(set(g.nodes)) != test.world:
            raise ValueError(f"group {g.nodes} is not {test.world} distinct nodes")
        if not g.suspects or not set(g.suspects) <= remaining or set(g.fillers) & set(test.suspects):
            raise ValueError(f"group {g.nodes}: suspects {g.suspects} must be uncleared suspects, fillers none")
        if len(g.suspects) == 1 and set(g.fillers) & test.met(g.suspects[0]):
            raise ValueError(
                f"group {g.nodes}: {g.suspects[0]} sat alone with {sorted(set(g.fillers) & test.met(g.suspects[0]))} before"
            )
        if seen & set(g.nodes):
            raise ValueError(f"group {g.nodes} shares nodes with another group of the round")
        seen.update(g.nodes)
    if not results:
        raise ValueError("a round needs at least one group")
    return GroupTest(test.suspects, test.confirmations, test.max_rounds, (*test.history, tuple(results)))


def false_accusation_bound(world: int, confirmations: int, cheater_fraction: float) -> float:
    """Upper bound on the probability that an honest suspect is named: each of its
    ``confirmations`` solo groups held a cheating filler among its W - 1 fresh ones, each filler
    a cheater with probability ``cheater_fraction`` independently.

    Raises:
        ValueError: world < 2, confirmations < 1 or a fraction outside [0, 1].
    """
    if world < 2 or confirmations < 1 or not 0.0 <= cheater_fraction <= 1.0:
        raise ValueError(
            f"world {world} >= 2, confirmations {confirmations} >= 1, fraction {cheater_fraction} in [0, 1]"
        )
    return (1.0 - (1.0 - cheater_fraction) ** (world - 1)) ** confirmations
