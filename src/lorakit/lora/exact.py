"""Exact merge and unmerge of one weight: W0 + Σ ΔW, computed in fp32 and rounded once.

Low-precision `W += ΔW; W -= ΔW` drifts, so the original W0 is kept aside while anything is
merged (memory: one copy of that weight) and unmerging restores it bit for bit in any dtype;
repeated merge/unmerge cycles cannot drift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor


class MergeError(ValueError):
    """A merge would write NaN or infinite values into the base weights; nothing was changed."""


class ExactMerge:
    """The merge state of one base weight."""

    def __init__(self) -> None:
        self.original: Tensor | None = None  # W0, held only while something is merged

    @torch.no_grad()
    def apply(self, weight: Tensor, deltas: Sequence[Tensor], safe: bool, why_not_finite: Callable[[], str]) -> None:
        """Make `weight` W0 + Σ `deltas` (fp32, same layout); no deltas restores W0.

        Safe merge (`safe`, PEFT's safe_merge): a result holding NaN or inf (a broken adapter,
        or an overflow of the base dtype) raises MergeError and leaves the weight as it was.
        The check is one pass over the weight, cheap next to the B·A products."""
        if not deltas:
            self.restore(weight)
            return
        original = self.original if self.original is not None else weight.detach().clone()
        merged = original.float()
        for delta in deltas:
            merged = merged + delta.to(merged.device)
        merged = merged.to(weight.dtype)
        if safe and not torch.isfinite(merged).all():
            raise MergeError(why_not_finite())
        self.original = original
        weight.copy_(merged)

    @torch.no_grad()
    def restore(self, weight: Tensor) -> None:
        if self.original is not None:
            weight.copy_(self.original)
            self.original = None

    def forget(self) -> None:
        """The merge is final (merge_and_unload): drop the copy kept for unmerging."""
        self.original = None


class MergesByName:
    """`merge` / `unmerge` of a wrapper in terms of its `set_merged(names, safe)` (the weight
    as W0 plus exactly the named adapters) and its `active_adapters` / `merged_adapters`."""

    active_adapters: list[str]
    merged_adapters: list[str]

    def set_merged(self, names: Iterable[str], safe: bool = True) -> None:
        raise NotImplementedError

    def merge(self, names: Sequence[str] | None = None, safe: bool = True) -> None:
        names = self.active_adapters if names is None else names
        self.set_merged(list(dict.fromkeys([*self.merged_adapters, *names])), safe=safe)

    def unmerge(self) -> None:
        self.set_merged([])
