"""H200: linear-attention kernel configs (and the dq/dk split, kernels.SPLIT_DQDK), timed at long and short T.

Each job forces one complete set of configs (all four kernels, so nothing autotunes and only the job's
kernels compile) or none ("auto": the autotuner), for key width DK (value width 128), with dq and dk in one launch or two. Jobs compile in parallel subprocesses, then run one at a time, each in a fresh
process (a CUDA fault stays in its job): median fwd and fwd+bwd times (elu+1, normalized, causal, B=1
H=16) at T = 131072 and 8192 (so "auto" tunes at 128k, as the benchmark's first case does), CUDA time per
kernel at 131072, then a bf16 correctness check at B=2 T=1000 H=3 against the fp64 reference (pass: every
error of o, dq, dk, dv within 2x the error of the reference run in bf16).

    PYTHONPATH=src python scripts/gpu_la_tune.py        (~5 min; table last, $OUT/la_tune.json)
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
MARK = "@@LA_TUNE@@"
KERNELS = ("chunk_state_kernel", "fwd_kernel", "bwd_dqdk_kernel", "bwd_dv_kernel")
# one factor at a time from the first entries of kernels.CONFIGS ("base"); the dq/dk configs with
# kernels.SPLIT_DQDK on (two launches, one state each)
ALTERNATIVES = {
    "bwd_dqdk_kernel": [(64, 32, 4, 2), (64, 64, 4, 2)],
}
SPLIT_ALTERNATIVES = ("bwd_dqdk_kernel",)


def jobs() -> list[dict]:
    from mmm.ops.linear_attention import kernels

    base = {k: tuple(kernels.CONFIGS[k][0]) for k in KERNELS}
    out = [dict(label="auto", configs=None, dk=128, split=False),
           dict(label="auto split", configs=None, dk=128, split=True)]
    for k, alts in ALTERNATIVES.items():
        split = k in SPLIT_ALTERNATIVES
        out += [dict(label=f"{k.replace('_kernel', '')}={','.join(map(str, c))}{' split' if split else ''}",
                     configs={**base, k: c}, dk=128, split=split) for c in alts]
    out += [dict(label="dk256 auto", configs=None, dk=256, split=False),
            dict(label="dk256 auto split", configs=None, dk=256, split=True)]
    return out


def worker(job: dict, warm_only: bool) -> dict:
    import torch
    from triton.testing import do_bench

    from mmm.ops.linear_attention import kernels, linear_attention_naive, op

    kernels.SPLIT_DQDK = job["split"]
    dk, dv, bf = job["dk"], 128, torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 1000, 3, dk, generator=gen) for _ in range(2))
    v, go = (torch.randn(2, 1000, 3, dv, generator=gen) for _ in range(2))
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = linear_attention_naive(q64, k64, v64, "elu", True, True)
    ref = [ref.detach(), *torch.autograd.grad(ref, (q64, k64, v64), go.double())]

    def grads(fn, dtype, dev):
        ts = [t.to(dev, dtype).requires_grad_() for t in (q, k, v)]
        o = fn(*ts)
        return [o.detach(), *torch.autograd.grad(o, ts, go.to(dev, dtype))]

    if warm_only:
        grads(lambda a, b, c: op._kernel_forward(a, b, c, "elu", True, True, 1e-6, seg_len=256), bf, "cuda")
        return {"warm": True}
    out = {}
    for T in (131072, 8192):
        x = [torch.randn(1, T, 16, d, device="cuda", dtype=bf, requires_grad=True) for d in (dk, dk, dv)]
        g = torch.randn(1, T, 16, dv, device="cuda", dtype=bf)
        fwd = lambda: op._kernel_forward(*x)  # noqa: E731
        step = lambda: torch.autograd.grad(fwd(), x, g)  # noqa: E731
        step()
        out[f"fwd_{T}"] = round(do_bench(fwd, warmup=10, rep=100, return_mode="median"), 4)
        out[f"fb_{T}"] = round(do_bench(step, warmup=10, rep=100, return_mode="median"), 4)
        if T == 131072:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
            out["kernels_ms"] = {e.key.split("_kernel")[0]: round(e.device_time_total / 3e3, 3)
                                 for e in prof.key_averages() if "_kernel" in e.key and e.device_time_total > 0}
        del x, g
    ours = grads(lambda a, b, c: op._kernel_forward(a, b, c, "elu", True, True, 1e-6, seg_len=256), bf, "cuda")
    mine = grads(lambda a, b, c: linear_attention_naive(a, b, c, "elu", True, True), bf, "cpu")
    rel = lambda a, b: float((a.double().cpu() - b).norm() / b.norm())  # noqa: E731
    ratio = max(rel(a, r) / rel(b, r) for a, b, r in zip(ours, mine, ref))
    out.update(worst_ratio=round(ratio, 3), ok=ratio <= 2)
    out["chosen"] = {n: [c.kwargs["BT"], c.kwargs.get("BK", c.kwargs.get("BV")), c.num_warps, c.num_stages]
                     for n in KERNELS if (c := getattr(getattr(kernels, n), "best_config", None)) is not None}
    return out


def run(job: dict, warm_only: bool, timeout: float) -> dict:
    env = dict(os.environ)
    if job["configs"]:
        env["MMM_LA_CONFIG"] = ";".join(f"{k}={','.join(map(str, c))}" for k, c in job["configs"].items())
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)] + (["--warm"] if warm_only else [])
    t = time.time()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith(MARK)), None)
        res = json.loads(line[len(MARK):]) if line else {"error": (p.stdout + p.stderr)[-400:]}
    except subprocess.TimeoutExpired:
        res = {"error": f"timeout {timeout}s"}
    return {**job, **res, "wall_s": round(time.time() - t, 1)}


def main() -> None:
    if "--worker" in sys.argv:
        job = json.loads(sys.argv[sys.argv.index("--worker") + 1])
        try:
            res = worker(job, "--warm" in sys.argv)
        except Exception as e:  # a fault or out-of-resources is this job's result
            res = {"error": f"{type(e).__name__}: {e}"[:400]}
        print(MARK + json.dumps(res), flush=True)
        return
    todo = jobs()
    start = time.time()
    with cf.ThreadPoolExecutor(min(len(todo), 14)) as pool:  # compile in parallel (fills the cache)
        warm = list(pool.map(lambda j: run(j, True, 240), todo))
    print(f"compiled {len(todo)} jobs in {time.time() - start:.0f}s", flush=True)
    results = []
    for job, w in zip(todo, warm):
        r = run(job, False, 90) if "error" not in w else w
        results.append(r)
        print(json.dumps({k: r.get(k) for k in ("label", "dk", "ok", "worst_ratio", "fwd_131072", "fb_131072",
                                                "fwd_8192", "fb_8192", "kernels_ms", "chosen", "error")}), flush=True)
        with open(os.path.join(os.environ.get("OUT", "."), "la_tune.json"), "w") as f:
            json.dump(results, f, indent=1)
    print(f"\n{'job':<34} {'ok':>5} {'fwd128k':>8} {'f+b128k':>8} {'fwd8k':>7} {'f+b8k':>7}  kernels at 128k (ms)")
    for r in results:
        ks = " ".join(f"{k}={v}" for k, v in (r.get("kernels_ms") or {}).items())
        cells = [f"{r[c]:.3f}" if c in r else "-" for c in ("fwd_131072", "fb_131072", "fwd_8192", "fb_8192")]
        print(f"{r['label']:<34} {str(r.get('ok', 'ERR')):>5} {cells[0]:>8} {cells[1]:>8} {cells[2]:>7} {cells[3]:>7}  "
              f"{ks or r.get('error', '')[:80]}")


if __name__ == "__main__":
    main()
