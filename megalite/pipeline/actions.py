"""The schedule IR: compute actions written ``{stage}{F|B|I|W}{microbatch}``.

The grammar of torch.distributed.pipelining (DESIGN.md principle 3):

    F  forward of a microbatch on a stage
    B  full backward: input gradient and weight gradients together
    I  backward to the stage input only (zero-bubble "B-input"); its W comes later
    W  weight gradients of a microbatch whose I has run

A schedule is ``{rank: [action, ...]}``, each rank's actions in execution order. A rank may
own several stages (interleaved "loop" placement: stage s on rank s mod p; "V" placement:
rank r owns stages r and 2p-1-r). Placement is part of the data: which rank lists a stage's
actions is the rank that owns it (`stage_to_rank`).

Communication is implied, never written: F on stage s > 0 consumes the activation that F on
stage s-1 produced; B or I on stage s < last consumes the input gradient that B or I on stage
s+1 produced. Between stages on one rank the tensor is handed over without communication.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

KINDS = ("F", "B", "I", "W")
_ACTION_RE = re.compile(r"(\d+)([FBIW])(\d+)")


@dataclass(frozen=True, order=True)
class Action:
    """One compute action: `Action(1, "B", 0)` is written "1B0"."""

    stage: int
    kind: str
    microbatch: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"action kind must be one of {KINDS}, got {self.kind!r}")
        if self.stage < 0 or self.microbatch < 0:
            raise ValueError(f"stage and microbatch must be >= 0, got {self}")

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> "Action":
        return parse_action(text)


ActionLike = Union[str, Action]
Schedule = Mapping[int, Sequence[ActionLike]]


def parse_action(text: ActionLike) -> Action:
    """Parse "0F3" into Action(0, "F", 3); an Action is returned unchanged."""
    if isinstance(text, Action):
        return text
    match = _ACTION_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"malformed action {text!r}: write {{stage}}{{F|B|I|W}}{{microbatch}}, "
                         f"e.g. '0F3', '1B0', '1I0', '1W0'")
    stage, kind, mb = match.groups()
    return Action(int(stage), kind, int(mb))


def stage_to_rank(schedule: Schedule) -> dict[int, int]:
    """{stage: rank} read from the schedule: the rank whose list holds a stage's actions.

    Raises if a stage appears on two ranks, or if stages are missing in between (every
    stage 0..max must be owned by some rank)."""
    owner: dict[int, int] = {}
    first: dict[int, tuple[int, Action]] = {}  # stage -> (index, action) of its first mention
    for rank in sorted(schedule):
        for i, text in enumerate(schedule[rank]):
            try:
                a = parse_action(text)
            except ValueError as e:
                raise ValueError(f"rank {rank}, action {i}: {e}") from None
            if owner.setdefault(a.stage, rank) != rank:
                j, b = first[a.stage]
                raise ValueError(f"stage {a.stage} appears on rank {owner[a.stage]} (action {j}, "
                                 f"{b}) and on rank {rank} (action {i}, {a}); each stage lives "
                                 f"on one rank: move one of them")
            first.setdefault(a.stage, (i, a))
    missing = sorted(set(range(max(owner, default=-1) + 1)) - set(owner))
    if missing:
        raise ValueError(f"no rank runs stages {missing}; every stage between 0 and the last "
                         f"needs its actions on one rank")
    return owner


def rank_stages(schedule: Schedule) -> dict[int, list[int]]:
    """{rank: [stages it owns, ascending]} read from the schedule (ranks with no action too)."""
    owner = stage_to_rank(schedule)
    return {r: sorted(s for s, o in owner.items() if o == r) for r in sorted(schedule)}
