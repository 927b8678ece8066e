"""`mmm bench`: time structured layers against their dense baseline on this machine, side by side."""

from __future__ import annotations

import argparse
import sys
import time

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

EPILOG = """\
examples:
  mmm bench --quick                                   tiny sizes, seconds on a CPU
  mmm bench --cases 'linear.square.*' --json out.json  full-size square linear maps on the GPU
  mmm bench --list                                    every case, quick and full-size

Each case runs its variants one at a time; the baseline (dense cuBLAS for linear maps) is timed in the
same run, and speedup = baseline time / variant time. Roofline floor = max(FLOPs / matmul rate,
bytes / copy bandwidth), both rates measured at the start of the run. A variant that fails (OOM, an
unsupported dtype, ...) is reported with its error and the run goes on.
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time structured layers against dense cuBLAS on this machine, with the roofline",
        description="Time structured layers against their dense baseline, side by side in one run.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--quick", action="store_true",
                   help="the quick case set (tiny sizes) with few repeats: CPU-friendly, for a smoke test")
    p.add_argument("--cases", nargs="+", metavar="PATTERN",
                   help="case names or globs, e.g. 'linear.up4x.*' (default: every case of the set; "
                        "commas also separate)")
    p.add_argument("--variants", nargs="+", metavar="PATTERN",
                   help="time only the variants whose labels match one of these globs (case-insensitive, e.g. "
                        "'linear*' 'hybrid*'), beside the baseline, which always runs")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--json", metavar="PATH", help="write every number, machine header included, as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as markdown")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of speedup vs baseline per variant and case")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"mmm bench: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from . import report
    from .machine import machine_header
    from .registry import CASES, UnknownCaseError, load_builtin_cases, select_cases
    from .runner import run_cases
    from .timing import FULL, QUICK

    load_builtin_cases()
    if args.list:
        width = max(len(name) for name in CASES)
        for case in CASES.values():
            print(f"{case.name:<{width}}  {case.group:<10} {'quick' if case.quick else 'full':<5}  {case.description}")
        return 0

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        return _fail(f"--device: {exc}")
    if device.type not in ("cpu", "cuda"):
        return _fail(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda was asked for but torch sees no CUDA device (try --device cpu --quick)")
    dtype = getattr(torch, DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")])

    patterns = [p for arg in args.cases or [] for p in arg.split(",") if p]
    try:
        cases = select_cases(patterns or None, args.quick)
    except UnknownCaseError as exc:
        return _fail(str(exc))
    if not cases:
        return _fail(f"no {'quick' if args.quick else 'full-size'} bench cases are registered")
    if device.type == "cpu" and not args.quick and not patterns:
        return _fail("the full-size cases (n=8192, d up to 32768) would take hours on a CPU; "
                     "use --quick, or name the cases to run with --cases")

    start = time.perf_counter()
    header = machine_header(device, dtype, args.quick)
    print("\n".join(report.header_lines(header)), flush=True)
    timer = QUICK if args.quick else FULL
    results = {
        "header": header,
        "settings": {"quick": args.quick, "device": str(device), "warmup_ms": timer.warmup_ms,
                     "rep_ms": timer.rep_ms, "min_reps": timer.min_reps, "wall_s": None},
        "cases": [],
    }
    outputs = [(path, write) for path, write in ((args.json, report.write_json), (args.markdown, report.write_markdown),
                                                 (args.plot, report.write_plot)) if path]

    def write_outputs(cases: list[dict], plot: bool = True) -> None:
        # the tables are rewritten after every row, so a run cut short (a timeout) still leaves what it
        # measured; the plot (about a second to draw) after every case
        results["settings"]["wall_s"] = round(time.perf_counter() - start, 1)
        for path, write in outputs:
            if plot or write is not report.write_plot:
                write({**results, "cases": cases}, path)

    def case_done(case: dict) -> None:
        results["cases"].append(case)
        tqdm.write("\n" + report.case_table(case))
        write_outputs(results["cases"])

    run_cases(cases, device, dtype, args.quick, header, progress=not args.no_progress, on_case_done=case_done,
              variants=args.variants, on_row_done=lambda running: write_outputs(results["cases"] + [running], plot=False))
    rows = [r for c in results["cases"] for r in c["rows"]]
    failed = sum(1 for r in rows if r["error"]) + sum(1 for c in results["cases"] if c["error"])
    written = ", ".join(path for path, _ in outputs)
    print(f"\n{len(results['cases'])} case(s), {len(rows)} variant(s), {failed} error(s), "
          f"{results['settings']['wall_s']} s" + (f"; wrote {written}" if written else ""))
    return 0
