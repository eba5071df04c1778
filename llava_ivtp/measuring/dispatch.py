"""Operators a model dispatches: a `TorchDispatchMode` that counts every aten call of a block.

On a GPU each operator that computes is about one kernel launch, so at batch 1, where kernels are short, the count
predicts launch-bound time on any device, and it does not move between runs the way time does on a shared CPU. View
operators (`view`, `transpose`, `slice`, `expand`, ...) launch nothing but cost host time; they are counted and also
reported apart (`views`).

    from llava_ivtp.measuring.dispatch import count_dispatched
    count = count_dispatched(lambda: model(**inputs))
    count.total, count.views, count.by_name.most_common(10)
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass
class DispatchCount:
    total: int = 0
    views: int = 0
    by_name: collections.Counter = field(default_factory=collections.Counter)

    @property
    def computing(self) -> int:
        """Operators that are not views (on a GPU: about the kernel launches)."""
        return self.total - self.views

    def as_dict(self, top: int = 0) -> dict:
        result = {"total": self.total, "views": self.views, "computing": self.computing}
        if top:
            result["top"] = dict(self.by_name.most_common(top))
        return result


class _Counting(TorchDispatchMode):
    def __init__(self, count: DispatchCount):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count.total += 1
        self.count.views += bool(func.is_view)
        self.count.by_name[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_dispatched(run) -> DispatchCount:
    """The aten operators `run()` dispatches (under `torch.inference_mode`)."""
    count = DispatchCount()
    with torch.inference_mode(), _Counting(count):
        run()
    return count


def per_step(run_steps, first: int, last: int) -> float:
    """Operators per decode step: `run_steps(n)` generates `n` tokens; the difference between `last` and `first`
    tokens, divided by the steps between them (the prefill and `generate`'s set-up cancel out)."""
    if last <= first:
        raise ValueError(f"per_step: last ({last}) must exceed first ({first}).")
    return (count_dispatched(lambda: run_steps(last)).total - count_dispatched(lambda: run_steps(first)).total) / (
        last - first
    )


__all__ = ["DispatchCount", "count_dispatched", "per_step"]
