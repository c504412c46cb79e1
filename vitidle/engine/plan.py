"""The idle plan: which blocks idle, and what fraction of the image tokens each one keeps."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UsageError

SCHEDULES = ("idlevit", "constant")


def check_keep(keep: float, what: str = "keep ratio") -> float:
    """Return `keep` as a float, or raise `UsageError` unless 0 < keep <= 1."""
    try:
        keep = float(keep)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a number in (0, 1], got {keep!r}") from None
    if not 0.0 < keep <= 1.0:  # also refuses NaN
        raise UsageError(f"{what} must be in (0, 1], got {keep:g}")
    return keep


@dataclass(frozen=True)
class IdlePlan:
    """Per block, the kept fraction of image tokens; None for a dense block.

    >>> plan = IdlePlan.idlevit(depth=12, keep=0.7)
    >>> plan.num_keep(196)[3:]
    [137, 137, 137, 96, 96, 96, 67, 67, 67]
    """

    keep: tuple[float | None, ...]

    def __post_init__(self):
        if not isinstance(self.keep, (tuple, list)):
            raise UsageError(f"a plan is one keep ratio or None per block, got {self.keep!r}")
        keep = tuple(None if k is None else check_keep(k, f"plan keep ratio of block {i}") for i, k in enumerate(self.keep))
        object.__setattr__(self, "keep", keep)

    @classmethod
    def idlevit(cls, depth: int, keep: float) -> IdlePlan:
        """IdleViT's plan: the first quarter of the blocks dense, the rest in three stages at r, r², r³."""
        keep = check_keep(keep)
        num_dense = depth // 4
        num_idle = depth - num_dense
        # stage sizes as equal as possible; a remainder goes to the earlier stages
        sizes = [num_idle // 3 + (1 if i < num_idle % 3 else 0) for i in range(3)]
        ratios = [keep ** (stage + 1) for stage, size in enumerate(sizes) for _ in range(size)]
        return cls(tuple([None] * num_dense + ratios))

    @classmethod
    def constant(cls, depth: int, keep: float) -> IdlePlan:
        """The first quarter of the blocks dense, every later block at the same keep ratio."""
        keep = check_keep(keep)
        return cls(tuple([None] * (depth // 4) + [keep] * (depth - depth // 4)))

    @classmethod
    def parse(cls, text: str, depth: int) -> IdlePlan:
        """Parse 'BLOCK:KEEP' and 'FIRST-LAST:KEEP' entries, comma-separated; unlisted blocks stay dense.

        >>> IdlePlan.parse("1-2:0.5,3:0.25", depth=4).keep
        (None, 0.5, 0.5, 0.25)
        """
        keep: list[float | None] = [None] * depth
        for entry in filter(None, (e.strip() for e in text.split(","))):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?:(.+)", entry)
            if m is None:
                raise UsageError(f"plan entry {entry!r} is not BLOCK:KEEP or FIRST-LAST:KEEP (e.g. 3-5:0.7)")
            first, last = int(m[1]), int(m[2] if m[2] is not None else m[1])
            if not first <= last < depth:
                raise UsageError(f"plan entry {entry!r}: blocks must lie in 0..{depth - 1} with FIRST <= LAST")
            ratio = check_keep(m[3], f"plan entry {entry!r}: keep ratio")
            keep[first : last + 1] = [ratio] * (last - first + 1)
        if all(k is None for k in keep):
            raise UsageError(f"plan {text!r} idles no block; give at least one BLOCK:KEEP entry")
        return cls(tuple(keep))

    def num_keep(self, num_patches: int) -> list[int | None]:
        """K per block: int(num_patches · keep), at least 1; None for dense blocks."""
        # the epsilon keeps 196 * 0.7**2 from landing just under an integer it should reach
        return [None if k is None else max(1, int(num_patches * k + 1e-6)) for k in self.keep]

    def describe(self, num_patches: int, num_keep: list[int | None] | None = None) -> str:
        """One line, e.g. 'blocks 3-5: 0.7 (137), 6-8: 0.49 (96), 9-11: 0.343 (67) [...]'.

        With `num_keep` (the counts the model runs now, `rewrite.num_keep_of`), a count moved away from
        the plan's is shown with its own ratio.

        >>> IdlePlan((None, 0.5, 0.5)).describe(16, [None, 8, 2])
        'blocks 1: 0.5 (8), 2: 0.125 (2) [block: keep (image tokens kept)]'
        """
        planned = self.num_keep(num_patches)
        counts = planned if num_keep is None else num_keep
        ratios = [r if n == p else (None if n is None else n / num_patches) for r, n, p in zip(self.keep, counts, planned)]
        runs: list[list] = []
        for i, (k, n) in enumerate(zip(ratios, counts)):
            if k is None:
                continue
            if runs and runs[-1][1] == i - 1 and runs[-1][2] == k:
                runs[-1][1] = i
            else:
                runs.append([i, i, k, n])
        parts = [f"{a}-{b}" if a != b else f"{a}" for a, b, _, _ in runs]
        out = [f"{p}: {k:.4g} ({n})" for p, (_, _, k, n) in zip(parts, runs)]
        return "blocks " + ", ".join(out) + " [block: keep (image tokens kept)]"


def make_plan(depth: int, keep: float = 0.7, schedule: str = "idlevit", plan: str | None = None) -> IdlePlan:
    """The plan a user asks for: an explicit `plan` string, else `schedule` at `keep`."""
    if plan is not None:
        return IdlePlan.parse(plan, depth)
    if schedule not in SCHEDULES:
        raise UsageError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    return getattr(IdlePlan, schedule)(depth, keep)
