"""Window and hybrid attention on the GPU (FlexAttention paths): correctness first, then speed against cuDNN.

Run on the H200 from the repository root (about 3 minutes, most of it compiling flex kernels):
    PYTHONPATH=src python scripts/gpu_attention_paths.py
    PYTHONPATH=src python scripts/gpu_attention_paths.py --smoke   # CPU dry run: tiny, forward only
Prints a table last; full numbers go to $OUT/attention_paths.json and $OUT/attention_paths.md (or ./).

1. correctness in bf16 against fp64 (mmm.attention.naive), output and dq, dk, dv, T = 2001 (ragged),
   causal (16 heads) and two-sided (16 query heads on 4 kv heads), D = 128, w = 256:
   window: error <= 2x PyTorch's own bf16 error, i.e. SDPA in bf16 with the same band as a boolean mask;
   hybrid (elu, Triton far part): error <= 2x the hybrid formula computed densely in bf16 by PyTorch.
2. timing (triton.testing.do_bench, median) at T in {8k, 32k, 128k}, B = 1, H = 16, D = 128, bf16, causal:
   cuDNN SDPA (baseline), mmm window w and hybrid w (elu) for w in {256, 1024}, mmm linear elu for
   reference; forward and forward+backward (inputs require grad in both, as in the anchors), speedup vs
   cuDNN, and the first call's time (compilation). Cases stop early past a time budget (--budget-s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import mmm  # noqa: E402
from mmm.attention import api, flex, naive  # noqa: E402
from mmm.attention.feature_maps import make_feature_map  # noqa: E402

RESULTS: dict = {"correctness": {}, "timing": {}}
START = time.perf_counter()


def log(section, key, value):
    RESULTS[section][key] = value
    print(f"[{time.perf_counter() - START:6.1f}s] {section}.{key}: {value}", flush=True)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def errors(out_fn, q, k, v, ref, g):
    """Relative errors of out_fn() and its dq, dk, dv against the fp64 `ref` (a tensor built from q, k, v)."""
    want = torch.autograd.grad(ref, (q, k, v), g) if q.requires_grad else ()
    out = out_fn()
    errs = {"o": rel(out, ref)}
    if q.requires_grad:
        for name, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), g.to(out.dtype)), want):
            errs[name] = rel(a, b)
    return errs


def band(t, window, causal, device):
    i = torch.arange(t, device=device)
    rel_pos = i[:, None] - i[None, :]
    return ((rel_pos >= 0) if causal else (rel_pos > -window)) & (rel_pos < window)


def sdpa_band_bf16(q, k, v, window, causal):
    """PyTorch's own bf16 window attention: SDPA with the band as a boolean mask ([B, T, H, D] layout)."""
    g = q.shape[2] // k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.repeat_interleave(g, 2).transpose(1, 2), v.repeat_interleave(g, 2).transpose(1, 2)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=band(q.shape[1], window, causal, q.device)).transpose(1, 2)


def dense_hybrid_bf16(q, k, v, fmap, window, causal, eps=1e-6):
    """The hybrid formula (naive.naive_hybrid) computed densely in the inputs' dtype end to end."""
    g, t = q.shape[2] // k.shape[2], q.shape[1]
    kk, vv = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bihd,bjhd->bhij", q, kk) * q.shape[-1] ** -0.5
    kappa = torch.einsum("bihf,bjhf->bhij", fmap(q, is_query=True), fmap(kk, is_query=False))
    i = torch.arange(t, device=q.device)
    visible = (i[None, :] <= i[:, None]) if causal else torch.ones(t, t, dtype=torch.bool, device=q.device)
    w = torch.where(band(t, window, False, q.device), s.exp(), kappa).masked_fill(~visible, 0.0)
    return torch.einsum("bhij,bjhe->bihe", w, vv) / (w.sum(-1).transpose(1, 2) + eps).unsqueeze(-1)


def correctness(dev, smoke):
    t, d, w = (45, 16, 8) if smoke else (2001, 128, 256)
    fmap = make_feature_map("elu", d).to(dev)
    ok = True
    for causal, hk in ((True, 16), (False, 4)):
        q, k, v = (torch.randn(1, t, n, d, device=dev).bfloat16().requires_grad_(not smoke) for n in (16, hk, hk))
        tag = f"{'causal' if causal else 'two_sided'}_h16_hk{hk}"
        g = torch.randn(1, t, 16, d, device=dev, dtype=torch.float64)
        for method, ref, own in (
            ("window", lambda: naive.naive_window(q, k, v, w, causal), lambda: sdpa_band_bf16(q, k, v, w, causal)),
            ("hybrid", lambda: naive.naive_hybrid(q, k, v, fmap.double(), w, causal), lambda: dense_hybrid_bf16(q, k, v, fmap, w, causal)),
        ):
            path = api.attention_path(q, k, v, method, causal=causal, feature_map="elu")
            ours = errors(lambda: mmm.attention(q, k, v, method, window=w, causal=causal, feature_map="elu"), q, k, v, ref(), g)
            base = errors(own, q, k, v, ref(), g)
            passed = all(ours[key] <= 2 * base[key] for key in ours)
            ok &= passed
            log("correctness", f"{method}.{tag}", dict(path=path, mmm=ours, pytorch_bf16=base, passed=passed))
    return ok


def timed(fn, smoke):
    if smoke:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def timing(dev, smoke, budget_s):
    b, h, d = 1, (2 if smoke else 16), (16 if smoke else 128)
    lengths = (256, 512) if smoke else (8192, 32768, 131072)
    windows = (16, 64) if smoke else (256, 1024)
    rows = []
    for t in lengths:
        q, k, v = (torch.randn(b, t, h, d, device=dev, dtype=torch.bfloat16, requires_grad=not smoke) for _ in range(3))
        go = torch.randn_like(q)
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_(not smoke) for x in (q, k, v))
        cases = [("sdpa cudnn (baseline)", (qt, kt, vt), lambda: sdpa_cudnn(qt, kt, vt, dev), "sdpa:cudnn")]
        for w in windows:
            cases.append((f"window {w}", (q, k, v), lambda w=w: mmm.attention(q, k, v, "window", window=w), api.attention_path(q, k, v, "window")))
            cases.append((f"hybrid w={w} elu", (q, k, v), lambda w=w: mmm.attention(q, k, v, "hybrid", window=w, feature_map="elu"),
                          api.attention_path(q, k, v, "hybrid", feature_map="elu")))
        cases.append(("linear elu", (q, k, v), lambda: mmm.attention(q, k, v, "linear", feature_map="elu"), api.attention_path(q, k, v, "linear")))
        base = None
        for name, inputs, fn, path in cases:
            if time.perf_counter() - START > budget_s:
                log("timing", f"T{t}.{name}", "skipped: past the time budget")
                continue
            try:
                t0 = time.perf_counter()
                out = fn()
                if not smoke:
                    torch.autograd.grad(out, inputs, go if out.shape == go.shape else go.transpose(1, 2))
                    torch.cuda.synchronize()
                first_s = time.perf_counter() - t0
                fwd = timed(fn, smoke)
                grad_out = go if out.shape == go.shape else go.transpose(1, 2)
                fb = None if smoke else timed(lambda: torch.autograd.grad(fn(), inputs, grad_out), smoke)
                row = dict(T=t, variant=name, path=path, fwd_ms=fwd, fwdbwd_ms=fb, first_call_s=round(first_s, 2))
                if path == "sdpa:cudnn":
                    base = row
                row["speedup_fwd"] = None if base is None else base["fwd_ms"] / fwd
                row["speedup_fwdbwd"] = None if fb is None or base is None else base["fwdbwd_ms"] / fb
                rows.append(row)
                log("timing", f"T{t}.{name}", row)
            except Exception as e:  # keep the other cases; the error is in the results
                traceback.print_exc()
                log("timing", f"T{t}.{name}", f"error: {e!r}"[:400])
            if dev == "cuda":
                torch.cuda.empty_cache()
        del q, k, v, qt, kt, vt
    return rows


def sdpa_cudnn(qt, kt, vt, dev):
    if dev != "cuda":
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)


def table(rows):
    fmt = lambda x, p="{:.3f}": "-" if x is None else p.format(x)  # noqa: E731
    lines = ["| T | variant | path | fwd ms | fwd+bwd ms | speedup fwd | speedup f+b | first call s |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['T']} | {r['variant']} | {r['path']} | {fmt(r['fwd_ms'])} | {fmt(r['fwdbwd_ms'])} | "
                     f"{fmt(r['speedup_fwd'], '{:.2f}x')} | {fmt(r['speedup_fwdbwd'], '{:.2f}x')} | {r['first_call_s']} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU dry run (flex forced on, eager, forward only)")
    parser.add_argument("--budget-s", type=float, default=200.0, help="start no timing case after this many seconds")
    args = parser.parse_args()
    dev = "cpu" if args.smoke else "cuda"
    if args.smoke:
        flex.flex_applies = lambda *a: True  # CPU: take the flex paths anyway (eager flex, forward only)
    else:
        assert torch.cuda.is_available(), "needs a CUDA GPU (or --smoke)"
        RESULTS["device"] = torch.cuda.get_device_name()
    RESULTS["versions"] = dict(torch=torch.__version__, cuda=torch.version.cuda, mmm=getattr(mmm, "__version__", "?"))
    print(RESULTS["versions"], RESULTS.get("device", "cpu"), flush=True)
    torch.manual_seed(0)
    ok = correctness(dev, args.smoke)
    rows = timing(dev, args.smoke, args.budget_s)
    RESULTS["correctness_passed"] = ok
    RESULTS["wall_s"] = round(time.perf_counter() - START, 1)
    out_dir = os.environ.get("OUT", ".")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "attention_paths.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    md = f"# window / hybrid attention paths\n\n- {RESULTS.get('device', 'cpu')}, {RESULTS['versions']}\n" \
         f"- correctness passed: {ok} (details in attention_paths.json)\n- wall: {RESULTS['wall_s']} s\n\n{table(rows)}\n"
    with open(os.path.join(out_dir, "attention_paths.md"), "w") as f:
        f.write(md)
    print("\n" + md, flush=True)
    print("CORRECTNESS", "PASSED" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
