"""Why the slow kernels are slow: Nsight Compute's counters for one forward+backward of each workload whose
kernels run far from their floor (NEXT.md): linear attention (elu+1, normalized, causal; ~1/4 of the
copy bandwidth, latency-bound by the sm_90 report), Monarch b=128, Kronecker 128 x 128 and circulant at
the bench's d = 16384, n = 8192 (bf16).

    python scripts/gpu_ncu.py --profile          # on the GPU: runs itself under ncu, then summarises
    python scripts/gpu_ncu.py --summary FILE.csv # the summary of a saved raw CSV (any machine)

Everything is warmed up (autotuned, compiled) before cudaProfilerStart, so ncu (--profile-from-start off)
sees exactly one forward+backward per workload, each kernel replayed for its counters
(--clock-control none: the clocks stay as they are, see the device tool's METHOD.md). Writes
$OUT/ncu_raw.csv (every metric of the sections below, one row per kernel launch) and prints, per kernel:
duration, DRAM, L2, L1 and SM throughput and issue-slot use (% of peak), achieved occupancy, registers,
and its three largest warp stall reasons (cycles per issued instruction).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys

SECTIONS = ("SpeedOfLight", "ComputeWorkloadAnalysis", "Occupancy", "LaunchStats", "WarpStateStats", "MemoryWorkloadAnalysis")
LA_SHAPE = dict(B=1, T=32768, H=16, D=128)  # 32k: each kernel a few ms at most, replayed ~40 times


def workloads():
    """(name, f+b step) pairs on fresh bf16 inputs."""
    import torch

    import mmm
    from mmm.bench.cases_linear import structured_configs

    dev, dt = torch.device("cuda"), torch.bfloat16
    s = LA_SHAPE
    q, k, v = (torch.randn(s["B"], s["T"], s["H"], s["D"], device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    go = torch.randn_like(q)
    steps = [("linear attention elu T=32k", lambda: mmm.attention(q, k, v, "linear", feature_map="elu").backward(go)),
             # the same kernels without the normaliser's cross-row sums (z, den, r): what those cost
             ("linear attention elu unnormalized T=32k",
              lambda: mmm.attention(q, k, v, "linear", feature_map="elu", normalize=False).backward(go))]
    n, d = 8192, 16384
    x = torch.randn(n, d, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(n, d, device=dev, dtype=dt)
    configs = dict(structured_configs(d, d))
    for label in ("monarch b=128", "kronecker 1 term", "circulant"):
        layer = mmm.StructuredLinear(d, d, configs[label], bias=False, device=dev, dtype=dt)
        steps.append((label, lambda layer=layer: layer(x).backward(g)))
    return steps


def run_workloads() -> None:
    """The target process: warm up, then one f+b of each workload inside the profiled range."""
    import torch

    steps = workloads()
    for _, step in steps:
        for _ in range(3):
            step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for _, step in steps:
        step()
        torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def summary(path: str) -> str:
    """One line per kernel launch from ncu's raw CSV (row 2 holds units, later rows the launches)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header_at = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
    header, data = rows[header_at], [r for r in rows[header_at + 2:] if len(r) == len(rows[header_at])]
    col = {name: i for i, name in enumerate(header)}

    def get(r, name):
        return _number(r[col[name]]) if name in col else None

    stall_cols = [c for c in header if c.startswith("smsp__average_warps_issue_stalled_") and c.endswith("_per_issue_active.ratio")]
    out = [f"{'kernel':<44} {'us':>8} {'dram%':>6} {'l2%':>6} {'l1%':>6} {'sm%':>6} {'issue%':>6} {'occ%':>6} {'regs':>5}  "
           "top stalls (cycles per issued instruction)"]
    for r in data:
        stalls = sorted(((get(r, c) or 0.0, c.removeprefix("smsp__average_warps_issue_stalled_").removesuffix("_per_issue_active.ratio"))
                         for c in stall_cols), reverse=True)[:3]
        dur_ns = get(r, "gpu__time_duration.sum")
        # L2 and L1 too: dq/dk's K-tile programs each load the full-V g and v tiles (session 25's lead: L2-bound?)
        fields = [get(r, "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"),
                  get(r, "lts__throughput.avg.pct_of_peak_sustained_elapsed"),
                  get(r, "l1tex__throughput.avg.pct_of_peak_sustained_active"),
                  get(r, "sm__throughput.avg.pct_of_peak_sustained_elapsed"),
                  get(r, "sm__inst_issued.avg.pct_of_peak_sustained_active"),
                  get(r, "sm__warps_active.avg.pct_of_peak_sustained_active"),
                  get(r, "launch__registers_per_thread")]
        shown = ["-" if v is None else f"{v:.0f}" for v in fields]
        out.append(f"{r[col['Kernel Name']][:44]:<44} {(dur_ns or 0) / 1e3:>8.1f} "
                   + " ".join(f"{x:>6}" for x in shown[:-1]) + f" {shown[-1]:>5}  "
                   + ", ".join(f"{name} {v:.1f}" for v, name in stalls))
    return "\n".join(out)


def profile() -> None:
    out = os.environ.get("OUT", ".")
    report = os.path.join(out, "ncu_report")
    cmd = ["ncu", "--profile-from-start", "off", "--clock-control", "none", "--target-processes", "all",
           *[a for s in SECTIONS for a in ("--section", s)], "--force-overwrite", "--export", report,
           sys.executable, os.path.abspath(__file__), "--target"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    raw = os.path.join(out, "ncu_raw.csv")
    with open(raw, "w") as f:
        subprocess.run(["ncu", "--import", report + ".ncu-rep", "--csv", "--page", "raw"], stdout=f, check=True)
    try:
        print(summary(raw))
    except (StopIteration, KeyError, ValueError) as exc:  # the raw CSV is kept either way
        print(f"no summary ({type(exc).__name__}: {exc}); see {raw}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", action="store_true", help="run the workloads under ncu and summarise")
    p.add_argument("--target", action="store_true", help=argparse.SUPPRESS)  # the process ncu profiles
    p.add_argument("--summary", metavar="CSV", help="summarise a saved raw CSV")
    args = p.parse_args()
    if args.target:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
        run_workloads()
    elif args.summary:
        print(summary(args.summary))
    elif args.profile:
        profile()
    else:
        p.print_help()


if __name__ == "__main__":
    main()
