"""Presenting a bench run: console tables, markdown, JSON (everything) and a PNG of speedups.

A run's results are one dict: {"header": machine header, "settings": how it ran, "cases": [case
results]} where each case result has "rows" as produced by `runner.measure_variant` + `runner.derive`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Callable

# (row key, column title, formatter); a missing value prints as "-"
_ms = lambda v: f"{v:.4g}"  # noqa: E731
_x = lambda v: f"{v:.2f}x"  # noqa: E731
_r = lambda v: f"{v:.2f}"  # noqa: E731
COLUMNS: list[tuple[str, str, Callable]] = [
    ("variant", "variant", str),
    ("fwd_ms", "fwd ms", _ms),
    ("fwd_bwd_ms", "fwd+bwd ms", _ms),
    ("bwd_over_fwd", "bwd/fwd", _r),
    ("host_fwd_bwd_ms", "host f+b ms", _ms),  # near fwd+bwd ms: launch-bound (see bench/timing.py)
    ("speedup_fwd", "speedup fwd", _x),
    ("speedup_fwd_bwd", "speedup f+b", _x),
    ("flops", "GFLOP fwd", lambda v: f"{v / 1e9:.4g}"),
    ("flops_vs_baseline", "FLOPs/base", _r),
    ("floor_fwd_ms", "floor fwd ms", _ms),
    ("fwd_over_floor", "fwd/floor", _r),
    ("fwd_bwd_over_floor", "f+b/floor", _r),
    ("quality", "quality", lambda q: "; ".join(f"{k} {v:.3g}" for k, v in q.items())),
]


def _cells(row: dict) -> list[str]:
    out = []
    for key, _, fmt in COLUMNS:
        value = row.get(key)
        text = "-" if value is None or value == {} else fmt(value)
        if key == "variant" and row.get("baseline"):
            text += " (baseline)"
        if key == "variant" and row.get("error"):
            text += " [error]"
        out.append(text)
    return out


def _errors(case: dict) -> list[str]:
    lines = [f"case setup failed: {case['error']}"] if case.get("error") else []
    lines += [f"{r['variant']}: {r['error']}" for r in case["rows"] if r.get("error")]
    return lines


def header_lines(header: dict) -> list[str]:
    v = header["versions"]
    soft = ", ".join(f"{k} {v[k]}" for k in ("torch", "triton", "cuda", "cudnn", "mmm") if v.get(k))
    return [
        f"device: {header['device']}   dtype: {header['dtype']}",
        f"versions: {soft}",
        f"measured in this run: matmul {header['matmul_tflops']:.4g} TFLOP/s ({header['dtype']}, "
        f"{header['matmul_size']}^3), copy {header['copy_gbps']:.4g} GB/s",
        "floor = max(FLOPs / matmul rate, min bytes / copy bandwidth); speedup = baseline time / variant time",
        "host f+b ms: host time to issue one forward+backward, calls back to back (CUDA only); near fwd+bwd "
        "ms means launch-bound",
    ]


def case_table(case: dict) -> str:
    """Plain aligned text table of one case, errors listed beneath it."""
    grid = [[title for _, title, _ in COLUMNS]] + [_cells(r) for r in case["rows"]]
    widths = [max(len(line[i]) for line in grid) for i in range(len(COLUMNS))]
    fmt = lambda line: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))  # noqa: E731
    lines = [f"== {case['name']}  {case['description']}", fmt(grid[0]), fmt(["-" * w for w in widths])]
    lines += [fmt(line) for line in grid[1:]]
    lines += [f"  error: {e}" for e in _errors(case)]
    return "\n".join(lines)


def console_text(results: dict) -> str:
    return "\n\n".join(["\n".join(header_lines(results["header"]))] + [case_table(c) for c in results["cases"]])


def to_markdown(results: dict) -> str:
    lines = ["# mmm bench", ""] + [f"- {line}" for line in header_lines(results["header"])]
    settings = results.get("settings", {})
    if settings:
        lines.append("- settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    for case in results["cases"]:
        lines += ["", f"## {case['name']}", "", case["description"], ""]
        lines.append("| " + " | ".join(title for _, title, _ in COLUMNS) + " |")
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|")
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in case["rows"]]
        errors = _errors(case)
        if errors:
            lines += [""] + [f"- error: `{e}`" for e in errors]
    return "\n".join(lines) + "\n"


def _write_atomic(path: str, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written report."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".mmm-bench-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _write_atomic(path, write)


def write_json(results: dict, path: str) -> None:
    # NaN/inf are not JSON: write them as null
    clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731

    def walk(obj):
        if isinstance(obj, dict):
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [walk(v) for v in obj]
        return clean(obj)

    _write_text(path, json.dumps(walk(results), indent=1, default=str) + "\n")


def write_markdown(results: dict, path: str) -> None:
    _write_text(path, to_markdown(results))


def write_plot(results: dict, path: str) -> None:
    """PNG: one panel per case, speedup vs the baseline (forward and forward+backward) per variant, log scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    panels = []
    for case in results["cases"]:
        rows = [r for r in case["rows"] if not r["baseline"] and (r.get("speedup_fwd") or r.get("speedup_fwd_bwd"))]
        if rows:
            panels.append((case, rows))
    height = sum(1.0 + 0.32 * len(rows) for _, rows in panels) or 2.0
    fig = Figure(figsize=(9, height), layout="constrained")
    FigureCanvasAgg(fig)
    h = results["header"]
    fig.suptitle(f"speedup vs baseline, {h['device']}, {h['dtype']}", fontsize=9)
    if not panels:
        fig.text(0.5, 0.5, "no speedups measured (every variant or baseline failed)", ha="center")
    else:
        axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=[len(rows) + 2 for _, rows in panels])[:, 0]
        for ax, (case, rows) in zip(axes, panels):
            ys = list(range(len(rows)))
            fwd = [r.get("speedup_fwd") or math.nan for r in rows]
            fb = [r.get("speedup_fwd_bwd") or math.nan for r in rows]
            ax.barh([y - 0.2 for y in ys], fwd, height=0.4, label="forward")
            ax.barh([y + 0.2 for y in ys], fb, height=0.4, label="forward+backward")
            ax.axvline(1.0, color="black", linewidth=0.8)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_yticks(ys, [r["variant"] for r in rows], fontsize=7)
            ax.invert_yaxis()
            ax.set_title(f"{case['name']}  {case['description']}", fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
        axes[0].legend(fontsize=7, loc="best")
        axes[-1].set_xlabel("speedup vs baseline (baseline time / variant time; >1 is faster)", fontsize=8)
    _write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
