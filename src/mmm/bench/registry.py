"""What `mmm bench` can run: cases, their variants, and what each variant hands the timer.

A *case* is one problem at one size (e.g. an n x d -> d linear map). Its `setup(device, dtype, quick)`
allocates the shared inputs and returns the *variants* that solve it, one of them the baseline that
speedups are measured against. A variant is built lazily (`Variant.build() -> Workload`) when its turn
comes and dropped right after, so a case at full size holds one structure in memory at a time, and a
variant that fails to build is recorded like one that fails to run.

Adding a case:

    @bench_case("attention.causal.T8192", group="attention", description="B=1, H=16, D=128")
    def _(device, dtype, quick):
        q, k, v = ...
        return [Variant("sdpa", lambda: Workload(forward=lambda: sdpa(q, k, v), ...), baseline=True),
                Variant("linear elu+1", lambda: ...)]

Modules that define cases are listed in CASE_MODULES and imported by `load_builtin_cases()`.
"""

from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

# modules whose import registers cases; append yours here
CASE_MODULES = ["mmm.bench.cases_linear", "mmm.bench.cases_attention"]


@dataclass
class Workload:
    """What the runner times for one variant, and the cost model for its roofline floor.

    `forward` is timed under torch.no_grad (inference). `forward_backward` runs forward and backward
    (e.g. `y = f(x); y.backward(grad)`); the tensors in `grad_to_none` get their .grad dropped before
    every call. `flops`/`bytes` are those of the forward pass (bytes: the fewest a pass must move);
    `fwd_bwd_flops`/`fwd_bwd_bytes` those of forward+backward. `quality` maps a name to an error
    (e.g. {"attention rel. err": 0.03}); `info` is free-form and lands in the JSON.
    """

    forward: Callable[[], Any]
    forward_backward: Callable[[], Any] | None = None
    grad_to_none: Sequence[torch.Tensor] = ()
    flops: float | None = None
    bytes: float | None = None
    fwd_bwd_flops: float | None = None
    fwd_bwd_bytes: float | None = None
    quality: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Variant:
    label: str
    build: Callable[[], Workload]
    baseline: bool = False


@dataclass
class Case:
    name: str
    group: str
    setup: Callable[[torch.device, torch.dtype, bool], Iterable[Variant]]
    description: str = ""
    quick: bool = False  # part of the `--quick` set: tiny sizes that run in seconds on a CPU


CASES: dict[str, Case] = {}


class UnknownCaseError(ValueError):
    pass


def bench_case(name: str, group: str, description: str = "", quick: bool = False):
    """Decorator registering `setup(device, dtype, quick) -> variants` as the case `name`."""

    def wrap(setup):
        if name in CASES:
            raise ValueError(f"a bench case named {name!r} is already registered")
        CASES[name] = Case(name, group, setup, description, quick)
        return setup

    return wrap


def load_builtin_cases() -> dict[str, Case]:
    for module in CASE_MODULES:
        importlib.import_module(module)
    return CASES


def select_cases(patterns: Sequence[str] | None, quick: bool) -> list[Case]:
    """Cases of the quick or the full set whose names match any of the glob `patterns` (all when None).

    Every pattern must match at least one case of the set; otherwise UnknownCaseError lists them."""
    pool = [c for c in CASES.values() if c.quick == quick]
    if not patterns:
        return pool
    chosen: list[Case] = []
    for pattern in patterns:
        matched = [c for c in pool if fnmatch.fnmatchcase(c.name, pattern)]
        if not matched:
            which = "quick" if quick else "full-size"
            msg = f"no {which} bench case matches {pattern!r}; {which} cases: {', '.join(c.name for c in pool) or '(none)'}"
            other = [c.name for c in CASES.values() if c.quick != quick and fnmatch.fnmatchcase(c.name, pattern)]
            if other:
                msg += f" (matching {'full-size' if quick else 'quick'} cases: {', '.join(other)}; {'drop' if quick else 'add'} --quick)"
            raise UnknownCaseError(msg)
        chosen += [c for c in matched if c not in chosen]
    return chosen
