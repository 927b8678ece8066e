"""Runs cases: builds each variant in turn, times it, frees it, then derives the side-by-side numbers
(speedup against the baseline of the same run, backward/forward ratio, roofline floor)."""

from __future__ import annotations

import fnmatch
import gc
import sys
import time
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from ..ops._eager import direct_launch_count
from .registry import Case, Variant
from .timing import FULL, QUICK, TimerSettings, host_ms, median_ms, without_grad


def floor_ms(flops: float | None, nbytes: float | None, matmul_tflops: float, copy_gbps: float) -> float | None:
    """Roofline floor: max(FLOPs / matmul rate, bytes / copy bandwidth), in ms (None when neither is known)."""
    bounds = []
    if flops is not None:
        bounds.append(flops / (matmul_tflops * 1e12) * 1e3)
    if nbytes is not None:
        bounds.append(nbytes / (copy_gbps * 1e9) * 1e3)
    return max(bounds) if bounds else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den == 0 else num / den


def _error_text(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0] if first else ''}"[:300]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_variant(variant: Variant, device: torch.device, settings: TimerSettings) -> dict:
    """One row of raw measurements; an exception (OOM, unsupported dtype, ...) becomes its `error`."""
    row = {"variant": variant.label, "baseline": variant.baseline, "fwd_ms": None, "fwd_bwd_ms": None,
           "host_fwd_bwd_ms": None, "flops": None, "bytes": None, "fwd_bwd_flops": None, "fwd_bwd_bytes": None,
           "quality": {}, "info": {}, "error": None}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        work = variant.build()
        row.update(flops=work.flops, bytes=work.bytes, fwd_bwd_flops=work.fwd_bwd_flops,
                   fwd_bwd_bytes=work.fwd_bwd_bytes, quality=dict(work.quality), info=dict(work.info))
        row["fwd_ms"] = median_ms(without_grad(work.forward), device, settings)
        if work.forward_backward is not None:
            row["fwd_bwd_ms"] = median_ms(work.forward_backward, device, settings, work.grad_to_none)
            # ~100 ms of calls, 2 to 10: slow rows queue little work behind the host
            reps = max(2, min(10, int(100 / max(row["fwd_bwd_ms"], 1e-3))))
            direct = direct_launch_count()
            row["host_fwd_bwd_ms"] = host_ms(work.forward_backward, device, reps, work.grad_to_none)
            if device.type == "cuda":  # FastLaunch's direct launches per call (0: all went through Triton)
                row["info"]["direct_launches_per_call"] = round((direct_launch_count() - direct) / (reps + 1), 1)
    except Exception as exc:  # recorded in the report; the run goes on with the next variant
        row["error"] = _error_text(exc)
    finally:
        work = None
    if device.type == "cuda":
        row["info"]["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    # build (compilation, autotuning, fits, quality) + timing: where a long run spends its time
    row["info"]["wall_s"] = round(time.perf_counter() - start, 2)
    _free(device)
    return row


def derive(rows: list[dict], matmul_tflops: float, copy_gbps: float) -> list[dict]:
    """Add to each row the numbers that compare it: speedups (baseline time / variant time, from this
    run), FLOPs relative to the baseline, backward/forward ratio, roofline floors and time/floor."""
    base = next((r for r in rows if r["baseline"] and r["fwd_ms"] is not None), None)
    for r in rows:
        r["speedup_fwd"] = _ratio(base and base["fwd_ms"], r["fwd_ms"])
        r["speedup_fwd_bwd"] = _ratio(base and base["fwd_bwd_ms"], r["fwd_bwd_ms"])
        r["flops_vs_baseline"] = _ratio(r["flops"], base and base["flops"])
        bwd = None if r["fwd_bwd_ms"] is None or r["fwd_ms"] is None else r["fwd_bwd_ms"] - r["fwd_ms"]
        r["bwd_over_fwd"] = _ratio(bwd, r["fwd_ms"])
        r["floor_fwd_ms"] = floor_ms(r["flops"], r["bytes"], matmul_tflops, copy_gbps)
        r["floor_fwd_bwd_ms"] = floor_ms(r["fwd_bwd_flops"], r["fwd_bwd_bytes"], matmul_tflops, copy_gbps)
        r["fwd_over_floor"] = _ratio(r["fwd_ms"], r["floor_fwd_ms"])
        r["fwd_bwd_over_floor"] = _ratio(r["fwd_bwd_ms"], r["floor_fwd_bwd_ms"])
    return rows


def wanted(variant: Variant, patterns: Sequence[str] | None) -> bool:
    """Whether `variant` runs: baselines always (speedups need them), others when their label matches one
    of the glob `patterns` (case-insensitive), or always when there are none."""
    label = variant.label.lower()
    return variant.baseline or not patterns or any(fnmatch.fnmatchcase(label, p.lower()) for p in patterns)


def run_case(case: Case, device: torch.device, dtype: torch.dtype, quick: bool, header: dict,
             settings: TimerSettings | None = None, on_row_done: Callable[[dict], None] | None = None,
             variants: Sequence[str] | None = None) -> dict:
    """Time the variants of `case` (those `variants` selects, see `wanted`); `on_row_done` gets the case
    so far (rows derived) after each row."""
    settings = settings or (QUICK if quick else FULL)
    result = {"name": case.name, "group": case.group, "description": case.description, "error": None, "rows": []}
    try:
        for variant in case.setup(device, dtype, quick):
            if not wanted(variant, variants):
                continue
            row = measure_variant(variant, device, settings)
            result["rows"].append(row)
            # one line per variant as it ends, so a run cut short still shows where its time went
            tqdm.write(f"  {case.name} | {variant.label}: {row['info']['wall_s']:.1f} s"
                       + (f" ({row['error']})" if row["error"] else ""), file=sys.stderr)
            if on_row_done:
                derive(result["rows"], header["matmul_tflops"], header["copy_gbps"])
                on_row_done(result)
    except Exception as exc:  # setup itself failed (e.g. OOM allocating the inputs)
        result["error"] = _error_text(exc)
    _free(device)
    derive(result["rows"], header["matmul_tflops"], header["copy_gbps"])
    return result


def run_cases(cases: Sequence[Case], device: torch.device, dtype: torch.dtype, quick: bool, header: dict,
              on_case_done: Callable[[dict], None] | None = None, progress: bool = True,
              on_row_done: Callable[[dict], None] | None = None, variants: Sequence[str] | None = None) -> list[dict]:
    """Run `cases` in order (tqdm progress over cases); `header` supplies the roofline rates;
    `on_row_done` gets the running case after each of its rows, `on_case_done` each finished case;
    `variants`: label globs to time (see `wanted`)."""
    results = []
    bar = tqdm(cases, desc="mmm bench", unit="case", disable=not progress)
    for case in bar:
        bar.set_postfix_str(case.name)
        result = run_case(case, device, dtype, quick, header, on_row_done=on_row_done, variants=variants)
        results.append(result)
        if on_case_done:
            on_case_done(result)
    return results
