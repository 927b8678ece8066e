"""Triton kernels for chunked linear attention, forward and backward (layout [B, T, H, D]).

Widths: q, k (and dq, dk) are [B, T, H, DK], v, o (and do, dv) are [B, T, H, DV]. Every width in the
kernels plays the key role (rows of q/k tiles, the state's rows, z; BK tiles) or the value role (v/o/do
tiles, the state's columns; BV tiles). With DK == DV ("D" below) the code is what it was with one width.

Notation: a = phi(s q), b = phi(s k) (feature map applied in-kernel, in fp32, to the inputs times the
runtime float `scale` s; dq and dk carry s), S = sum b^T v (DK x DV state),
z = sum b (normalizer vector), den_t = a_t . z_t, rden = 1 / (den + eps), g = do * rden (do when not
normalizing), r_t = -(do_t . o_t) * rden_t (the normalizer's gradient).

Why segments: with B*H = 16 sequences a one-program-per-head sweep leaves most of the 132 SMs idle, and
storing the state at every chunk (fla's chunk scheme) moves 2x the bytes of q for D=128. So the sequence
is cut into NS segments of L tokens (L a multiple of every chunk size BT used here):
  1. chunk_state_kernel: each segment's local sum of b^T v (and of b), all segments in parallel;
  2. scan_kernel: exclusive prefix over segments (entry NS holds the total);
  3. a sweep over the segment's chunks, in parallel over segments, carrying the state in registers.
Backward mirrors it: local sums of a^T g (and of r a) per segment, a reverse (suffix) scan, then
  - dqdk_kernel: K-tiles x full V, reverse sweep holding S (walked backwards from the saved prefix of the
    next segment by subtracting each chunk's b^T v) and dS, giving dq and dk (both contract over V);
  - dv_kernel: V-tiles x full K, reverse sweep holding dS, giving dv (contracts over K).
All states and accumulations are fp32; operands of tl.dot are cast to the input dtype (bf16) on GPU.

Bytes, in units of one [B, T, H, D] bf16 tensor: forward reads k, v (states) then q, k, v and writes o:
6 (the minimum is 4); backward reads q, do, o (states, r; normalizing, it writes g = do * rden), then q,
k, v, g and writes dq, dk, then q, k, g and writes dv: 13, 14 with g (minimum 8). With elu or relu the
first kernel to compute a map's features writes them (b by the forward's chunk_state, a by the
backward's) and the later ones read them in place of k or q (op.map_costs): one unit more each
way, for fewer instructions in every later kernel (the kernels are issue-bound). Plus the fp32 segment
states, small unless segments are short. At T=128k, H=16, D=128 a unit is 0.54 GB, so about 0.8 ms forward
and 1.7 ms backward at 4.2 TB/s; the FLOPs
(~0.1 MFLOP per token and head forward, ~2.5x that backward) take about a third of that at 775
TFLOP/s. Memory-bound by design: the backward/forward ratio is about 2 at best.

DOT_MODE: 0 = operands in the input dtype (bf16), 1 = fp32 operands in tf32 (fp16 inputs, whose state
could overflow fp16, and fp32 inputs when torch.get_float32_matmul_precision() is not "highest"), 2 = fp32
operands, IEEE (fp32 inputs at PyTorch's default precision, where these dots spill registers on sm_90,
and everything under TRITON_INTERPRET, where bf16 dots are wrong).

Tile configs were chosen from the sm_90 compiler's report, which needs no GPU (triton.compile with
GPUTarget("cuda", 90, 32), then cuobjdump -res-usage on the cubin; scripts/gpu_linear_attention_configs.py
--ir prints it for every config): for D <= 128 the configs below compile at <= 255 registers with at most
~330 bytes of spills; D = 256 spills more (a [64, 256] row tile of q and of k is held in registers), so it
is correct but not tuned.

Why the kernels with several dots (fwd, dq/dk, dv) use 4 warps: the H200 run of 2026-11-28 died with an
illegal address inside fwd_kernel's bf16 dot, first fault at thread 128 (compute-sanitizer: "Out-of-range
shared or local address"), and no kernel index was found out of bounds (tests run every GPU tile config
under the interpreter with guarded buffers). Compiled for sm_90 with triton 3.6, the causal variant of each
of these kernels, at 8 warps and BT = 64, lays a 64-row dot result on warpsPerCTA = [8, 1] (warps 4-7,
threads 128+, hold a replica of the rows) and converts it to a [4, 2] layout or to the operand of the next
dot; at 4 warps, and at 8 warps when every dot has >= 128 rows, there is one layout and no such conversion.
Triton has reports of shared-memory faults on sm_90 in kernels with several tl.dot (triton-lang/triton
#10486, #10573, #11366), so configs with that conversion are excluded (_pruner's rule), not trusted.
scripts/gpu_linear_attention_configs.py runs every config alone on the GPU to confirm or prune further.

MMM_LA_CONFIG (diagnosis only, read at import): "fwd_kernel=64,32,4,2;bwd_dv_kernel=..." forces one
(BT, tile, num_warps, num_stages[, maxnreg]) config per named kernel; that config is launched as given, unpruned.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Segment lengths are multiples of every BT below, so chunks are full except at the end of the sequence
# (speed only: a segment of any length is swept correctly, with its last chunk masked).
SEGMENT_MULTIPLE = 16 if INTERPRET else 128
SCAN_BLOCK = 1024
# Every chunk length BT divides MAX_BT (`_configs` checks, forced configs included): with T and the segment
# length multiples of it, every chunk is whole and the kernels drop their row masks (FULL_CHUNKS).
MAX_BT = 128
FEATURE_CODES = {None: 0, "identity": 0, "elu": 1, "relu": 2}
# The map code for inputs that are features already, used as loaded (no scale): features an earlier
# kernel wrote as its dots take them, which the later kernels read in place of q or k (op.map_costs).
FEATURE_GIVEN = 3
LOG2E = tl.constexpr(1.4426950408889634)
LIBDEVICE = tl.constexpr(not INTERPRET)  # the interpreter has no libdevice functions

# (BT, tile size, num_warps, num_stages) per autotuned kernel, the tile being BK or BV.
# Best first: scripts/gpu_la_tune.py timed each alone at T = 128k (B=1, H=16, D=128, bf16, elu+1 normalized,
# results/h200/2026-12-04-la-tune.md): chunk_state (128, 128, 8, 2) 1.76 ms vs 2.77 for (128, 64, 8, 2);
# fwd (64, 64, 4, 2) 2.69 vs 3.93 for (64, 32, 4, 2); dv (64, 64, 4, 2) 1.99 vs 3.54. Wider value tiles
# recompute the features and the [BT, BT] scores for fewer tiles. (64, 128, 8, 2) was faster still for fwd
# and dv (2.42, 1.72) but has the replicated-row layout conversion behind the 2026-11-28 fault (--ir
# report of gpu_linear_attention_configs.py): not used. (16, 32, 4, 2) is for DK = 256 (Hedgehog), where
# the forward took 13.6 ms instead of 21.5 with the others.
CONFIGS = {
    # one dot: 8 warps are fine here (no layout conversion between dots). (128, 128, 8, 3): untimed, for
    # the autotuner to try (one program per SM either way by registers; a third stage may hide more of
    # the load latency: 172/198 KB of shared memory forward/backward, spills as with 2 stages)
    "chunk_state_kernel": [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 2), (64, 128, 8, 2), (64, 32, 4, 3)],
    # several dots: 4 warps (see the module docstring); BT = 32 dots run on the mma v2 path
    "fwd_kernel": [(64, 64, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2), (16, 32, 4, 2)],
    # (64, 64, 4, 2) only for the split launches (one state each: see bwd_dqdk_kernel's PART)
    "bwd_dqdk_kernel": [(64, 16, 4, 3), (64, 16, 4, 2), (64, 32, 4, 2), (64, 64, 4, 2)],
    "bwd_dv_kernel": [(64, 64, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2)],
}
INTERPRET_CONFIG = (16, 16, 1, 1)
# dq and dk in two launches of bwd_dqdk_kernel (PART 1 and 2) instead of one (PART 0): at T = 128k the
# backward kernel took 3.94 ms instead of 4.87 (f+b 10.22 vs 11.19 ms, scripts/gpu_la_tune.py, H200,
# 2026-12-04: features computed in every kernel). To time again (MMM_LA_SPLIT_DQDK=0, read at import):
# with the features given, PART 0 without ZDOT compiles to 883 SASS per chunk and no spills at (64, 16,
# 4, 2), against 781 + 899 and ~400 B of spills for the two ZDOT launches, and loads g and v once.
_SPLIT = os.environ.get("MMM_LA_SPLIT_DQDK", "1").strip()
if _SPLIT not in ("0", "1"):
    raise ValueError(f"MMM_LA_SPLIT_DQDK must be 0 or 1 (the default), got {_SPLIT!r}")
SPLIT_DQDK = _SPLIT == "1"  # the interpreter runs one config (autotuning several fails there)
# The normalizer's sums (z = sum b, and sum r a in the backward) as tensor-core dots x^T W with W [BT, ZW]
# of equal columns (ones; r in two bf16 parts), z carried as [.., ZW] equal columns (in fwd also a . z and
# the within-chunk sums as dots), instead of fp32 copies of whole feature tiles summed over their rows. Why:
# at T = 128k normalizing took identity features from 4.6 to 8.0 ms f+b, chunk_state from 0.55 to 1.74 ms
# (H200, results/h200/2026-11-28-la-breakdown.log): a cross-warp reduction every chunk.
ZW = tl.constexpr(16)
# MMM_LA_ZDOT: 0 (off), 1 (every kernel) or kernel names, e.g. "fwd" or "chunk_state,dqdk". History: a
# 2026-12-04 version faulted on the H200; on the H100 (2026-12-06) fwd's faulted, chunk_state's and
# dqdk's passed. fwd's was reworked and all three passed their bf16 GPU tests on the H100 (2026-12-07).
# Default: chunk_state and dqdk, the fastest there (results/h100/2026-12-07-s15-zdot-*: elu+1 f+b at
# 128k 9.06 ms vs 9.30 with fwd too and 9.75 off; relu 7.98 / 7.94 / 8.33): fwd's dot cost elu+1 0.26 ms.
# Session 24 (H100, results/h100/2026-12-07-s24-la-ab.jsonl) tried and reverted two rewrites, from the
# sm_90 compiler's counts: dq/dk's sums as [BT, BK] dots whose rows all hold z (613 / 665 SASS per chunk
# and no spills, against 878 / 990 and ~350 B here) ran slower, dqdk 2.53 -> 2.75 ms at 128k (plain sums:
# 2.99); the forward's a . z and within-chunk sums as dots too (SASS 1691 -> 1430) ran faster, fwd_kernel
# 1.83 -> 1.56 ms at D = 128, but faulted (illegal address) while autotuning at D = 64. Session 25 put
# that forward rewrite in as fwd's ZDOT, kept to 64-row chunks (`_pruner`: a likely cause of the fault)
# and off by default until its GPU tests pass (gpu_single.sh zdottest; zdotfwdcfg forces one config per
# process); with the keys given as features it compiles to 1117 SASS per chunk against 1358.
ZDOT_KERNELS = ("chunk_state", "fwd", "dqdk")
ZDOT_DEFAULT = "chunk_state,dqdk"
_ZDOT = os.environ.get("MMM_LA_ZDOT", ZDOT_DEFAULT).strip()
if _ZDOT in ("0", "1"):
    ZDOT: bool | frozenset = _ZDOT == "1"
else:
    ZDOT = frozenset(n.strip() for n in _ZDOT.split(","))
    if not ZDOT <= set(ZDOT_KERNELS):
        raise ValueError(f"MMM_LA_ZDOT must be 0 (off), 1 (on) or kernel names from {ZDOT_KERNELS} separated "
                         f"by commas (default {ZDOT_DEFAULT!r}), got {_ZDOT!r}")


def tune_bucket(n_pairs: int, seg_len: int) -> int:
    """The shape bucket in every autotuning key (the kernels' TUNE_BUCKET argument, otherwise unused): the
    best tiles depend on how many (sequence, segment) pairs share the GPU and how many chunks each one
    sweeps, so each kernel tunes once per bucket, not once per process (before, the first call's length
    chose the tiles for every length) nor per token count. Buckets: fewer than 64 pairs or not, times
    segments of <= 512, <= 4096 or more tokens; at 16 heads T <= 4k, 8k-32k and 128k are three buckets."""
    size = 0 if seg_len <= 512 else 1 if seg_len <= 4096 else 2
    return size + (3 if n_pairs >= 64 else 0)


def zdot(kernel: str) -> bool:
    """Whether `kernel` (one of ZDOT_KERNELS) runs its normalizer sums as dots (ZDOT: a bool or a set of names)."""
    return kernel in ZDOT if isinstance(ZDOT, frozenset) else bool(ZDOT)


def _forced_configs(spec: str) -> dict:
    """Parses MMM_LA_CONFIG: "kernel=BT,tile,num_warps,num_stages[,maxnreg];kernel=..." (see the module
    docstring; maxnreg caps the registers per thread, for more programs per SM)."""
    forced = {}
    for item in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, values = item.partition("=")
        try:
            numbers = tuple(int(x) for x in values.split(","))
        except ValueError:
            numbers = ()
        if name.strip() not in CONFIGS or len(numbers) not in (4, 5):
            raise ValueError(
                f"MMM_LA_CONFIG: expected 'kernel=BT,tile,num_warps,num_stages[,maxnreg]' items separated by ';' with "
                f"kernel one of {sorted(CONFIGS)}, got {item!r}")
        forced[name.strip()] = numbers
    return forced


FORCED = _forced_configs(os.environ.get("MMM_LA_CONFIG", ""))


def _configs(kernel: str, tile: str):
    if kernel in FORCED:
        options = [FORCED[kernel]]
    elif INTERPRET:
        options = [INTERPRET_CONFIG]
    else:
        options = CONFIGS[kernel]
    # an option is (BT, tile, num_warps, num_stages) or the same with a register cap (maxnreg) last
    for bt, *_ in options:
        if MAX_BT % bt:
            raise ValueError(f"{kernel}: chunk length BT={bt} must divide MAX_BT={MAX_BT}")
    return [triton.Config({"BT": bt, tile: t}, num_warps=w, num_stages=s, maxnreg=cap[0] if cap else None)
            for bt, t, w, s, *cap in options]


_WITH_CHUNK: dict = {}


def with_chunk(kernel, bt: int):
    """The autotuned `kernel` (bwd_dqdk_kernel or bwd_dv_kernel) with every config's chunk length BT set
    to bt (duplicates dropped), built once per (kernel, bt). For launches with INTRA off (the block
    hybrid's far part: hybrid_op), where the chunks must be the blocks."""
    key = (kernel, bt)
    if key not in _WITH_CHUNK:
        if MAX_BT % bt:
            raise ValueError(f"chunk length {bt} must divide MAX_BT={MAX_BT}")
        configs = {}
        for c in kernel.configs:
            kw = {**c.kwargs, "BT": bt}
            configs.setdefault((tuple(sorted(kw.items())), c.num_warps, c.num_stages, c.maxnreg),
                               triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages, maxnreg=c.maxnreg))
        _WITH_CHUNK[key] = triton.autotune(configs=list(configs.values()), key=kernel.keys,
                                           prune_configs_by={"early_config_prune": kernel.early_config_prune})(kernel.fn)
    return _WITH_CHUNK[key]


def _pruner(tile: str, n_states, max_tile_rows: int, state_rows: str | None = None, whole_row_groups=None):
    """Keep configs whose tile fits its width, whose fp32 state(s) (n_states of them: a number, or a
    function of the kernel's arguments) need <= 64 registers a thread and whose
    full-width [BT, W] row tiles have <= max_tile_rows * 128 elements (these limits keep ptxas from spilling
    much). The tile (BK or BV) splits one width (DK or DV, "tiled"); the kernel holds the other one whole
    ("full": the state is tile x full, its full-width row tiles are BT x full).
    state_rows, for kernels with several dots: the rows of their state-update dots ("full" or the tile, or
    a function of the kernel's arguments giving one or None); more than 4 warps then need every dot to
    have >= 16 rows per warp (the module docstring says why). whole_row_groups (a function of the
    kernel's arguments): when true, BT >= 16 rows per warp at any warp count. fwd_kernel's ZDOT has a dot
    with N = ZW, and at BT = 16 or 32 on 4 warps Triton then lays its mma v2 dots along M over all warps
    ([4, 1]: rows replicated across warps) and converts their results to dot operands and, through
    shared memory, to blocked layouts: the pattern of the 2026-11-28 fault, and fwd's ZDOT faulted while
    autotuning at D = 64 (session 24). At BT = 64 the same kernel has no such conversion (sm_90 ttgir).
    With nothing left, the smallest tile and fewest warps, the tile cut to its width. (Triton calls this
    only when a kernel has more than one config.)"""

    def widths(named_args, kwargs):
        dk, dv = ((kwargs[n] if n in kwargs else named_args[n]) for n in ("DK", "DV"))
        return (dk, dv) if tile == "BK" else (dv, dk)

    def safe_warps(c, full, rows_of):
        if rows_of is None or c.num_warps <= 4:
            return True
        rows = min(c.kwargs["BT"], full if rows_of == "full" else c.kwargs[tile])
        return rows >= 16 * c.num_warps

    def prune(configs, named_args, **kwargs):
        tiled, full = widths(named_args, kwargs)
        states = n_states({**named_args, **kwargs}) if callable(n_states) else n_states
        rows_of = state_rows({**named_args, **kwargs}) if callable(state_rows) else state_rows
        whole = bool(whole_row_groups and whole_row_groups({**named_args, **kwargs}))
        keep = [
            c for c in configs
            if c.kwargs[tile] <= tiled
            and states * c.kwargs[tile] * full <= 64 * 32 * c.num_warps
            and c.kwargs["BT"] * full <= max_tile_rows * 128
            and safe_warps(c, full, rows_of)
            and (not whole or c.kwargs["BT"] >= 16 * c.num_warps)
        ]
        if keep:
            return keep
        c = min(configs, key=lambda c: (c.kwargs[tile], c.num_warps))
        return [triton.Config({**c.kwargs, tile: min(c.kwargs[tile], tiled)}, num_warps=min(c.num_warps, 4), num_stages=c.num_stages)]

    return prune


@triton.jit
def _cast(x, like_ptr, DOT_MODE: tl.constexpr):
    """Operand for tl.dot: the input dtype in mode 0, fp32 otherwise."""
    if DOT_MODE == 0:
        return x.to(like_ptr.dtype.element_ty)
    else:
        return x.to(tl.float32)


@triton.jit
def _dot(a, b, DOT_MODE: tl.constexpr):
    if DOT_MODE == 2:
        return tl.dot(a, b, input_precision="ieee")
    elif DOT_MODE == 1:
        return tl.dot(a, b, input_precision="tf32")
    else:
        return tl.dot(a, b)


@triton.jit
def _exp2(x):
    if LIBDEVICE:
        return libdevice.exp2(x)  # flush-to-zero: one MUFU.EX2
    else:
        return tl.exp2(x)


@triton.jit
def _features(x, mt, like_ptr, scale, FEATURE: tl.constexpr, DOT_MODE: tl.constexpr):
    """phi(scale * x) computed in fp32, zeroed on the rows outside mask mt (phi(0) = 1 for elu), rounded
    once to the dot dtype. (scale: the feature maps' input scaling, d^-1/4, applied here rather than in a
    separate pass over q and k and their gradients; scale > 0, so elu's exp(s x) for x <= 0 is one exp2
    of x s log2(e), with no min(x, 0) first: on x > 0 the select discards it, inf or not, and ptxas
    predicates the MUFU off there.) Every later use (dots, normalizer sums, phi') reads this one copy,
    so forward and backward see the same features, and no fp32 tile stays live (register pressure is what
    limits these kernels); except fwd_kernel's plain normalizer sums (see there).
    Instruction count is what limits them next (ncu: issue-bound at 2 programs per SM): per element
    this is an unpack, a compare, a multiply, a multiply-add and one predicated MUFU (libdevice's exp2 is
    flush-to-zero: tl.exp's denormal guard cost 3 more instructions; results below 2^-126 become 0, far
    inside bf16's rounding of the features), then the pack to bf16; dropping the min took 6-9% off the
    fwd and dv loops. mt None: no mask, where the rows outside it only ever meet zeros or feed
    rows that are not stored (each call says why): query rows (their do, rden and r load as 0), and key
    rows wherever their value rows (loaded as 0) and zero weights in the normalizer's dots cover them.
    FEATURE_GIVEN: x is features already (_phi returns them; the compiler drops the fp32 round trip:
    the same sm_90 SASS as skipping it)."""
    x = _phi(x, scale, FEATURE)
    if mt is not None:
        x = tl.where(mt[:, None], x, 0.0)
    return _cast(x, like_ptr, DOT_MODE)


@triton.jit
def _phi(x, scale, FEATURE: tl.constexpr):
    """phi(scale * x) in fp32 (`_features` masks it and rounds it for the dots). scale is cast: traced by
    torch.compile, float arguments arrive as fp64 and would make the features (and z, carried in the
    loop as fp32) fp64, which Triton refuses to compile."""
    x = x.to(tl.float32)
    scale = tl.cast(scale, tl.float32)
    if FEATURE == 1:
        return tl.where(x > 0, x * scale + 1.0, _exp2(x * (scale * LOG2E)))
    elif FEATURE == 2:
        return tl.maximum(x, 0.0) * scale
    elif FEATURE == 3:  # FEATURE_GIVEN
        return x
    else:
        return x * scale


@triton.jit
def _dphi(f, FEATURE: tl.constexpr):
    """phi'(x) read off f = phi(x): elu+1 gives min(f, 1) (1 for x > 0, exp(x) otherwise); relu gives [f > 0]."""
    f = f.to(tl.float32)
    if FEATURE == 1:
        return tl.minimum(f, 1.0)
    else:
        return tl.where(f > 0, 1.0, 0.0)


@triton.jit
def _row_sums(x_c, w, acc, like_ptr, DOT_MODE: tl.constexpr, EXACT: tl.constexpr):
    """acc + x_c^T w for w [BT, ZW] (equal columns), as tensor-core dots: acc's columns are the weighted
    sums over the rows of x_c. In mode 0 w goes in as bf16, in two parts (hi + lo, ~16 bits of w) unless
    EXACT (w exact in bf16: ones)."""
    xt = tl.trans(x_c)
    if DOT_MODE == 0:
        hi = w.to(like_ptr.dtype.element_ty)
        acc = tl.dot(xt, hi, acc)
        if not EXACT:
            acc = tl.dot(xt, (w - hi.to(tl.float32)).to(like_ptr.dtype.element_ty), acc)
        return acc
    else:
        return acc + _dot(xt, w, DOT_MODE)


@triton.jit
def _program(NT: tl.constexpr, NS, L, T, H, DK: tl.constexpr, DV: tl.constexpr):
    """1-D grid (no 65535 limit on B*H), tile index fastest, so the tiles of one (head, segment), which
    read the same rows, run side by side and share them through L2. Returns the tile, the flat
    batch*head index, the segment's first row as an int64 element offset into the key tensors
    [B, T, H, DK] and into the value tensors [B, T, H, DV], its first index into [B, H, T], and its length."""
    pid = tl.program_id(0).to(tl.int64)
    i_t = pid % NT
    i_s = (pid // NT) % NS
    i_bh = pid // NT // NS
    t_start = i_s * L
    t_len = (tl.minimum(t_start + L, T) - t_start).to(tl.int32)
    row = (i_bh // H) * T + t_start
    rowk0 = row * (H * DK) + (i_bh % H) * DK
    rowv0 = row * (H * DV) + (i_bh % H) * DV
    return i_t, i_s, i_bh, rowk0, rowv0, i_bh * T + t_start, t_len


@triton.jit
def _key_lag(i_s, L, LAG, H, DK: tl.constexpr, DV: tl.constexpr, HAS_LAG: tl.constexpr):
    """For a key lag (query t sees the keys s <= t - LAG: the key and value sequences shifted down by LAG
    rows): how far back the key rows of this segment's chunks sit, as int64 element offsets into the key
    [B, T, H, DK] and value [B, T, H, DV] tensors, and the first local row of the segment whose key exists
    (rows before it read and store no key: theirs would come before the sequence's start). Without
    HAS_LAG, zeros: the compiled kernel is the one without a lag (no extra registers: the lag's masks
    and offsets cost the fwd and backward kernels spills on sm_90, ptxas -v)."""
    zero = i_s * 0  # int64, like i_s
    if HAS_LAG:
        return (zero + LAG) * (H * DK), (zero + LAG) * (H * DV), zero + LAG - i_s * L
    else:
        return zero, zero, zero


@triton.jit
def _chunk_rows(offs_t, n_left, BT: tl.constexpr, FULL: tl.constexpr):
    """The rows of a chunk inside its segment, n_left rows remaining from the chunk's first. FULL: every
    chunk is whole (the op's `full_chunks`), so the mask is a constant that the compiler drops from every
    load, store and select: 7-10% fewer instructions in the fwd, dq/dk and dv loops (sm_90 SASS)."""
    if FULL:
        return tl.full([BT], 1, tl.int1)
    else:
        return offs_t < n_left


@triton.jit
def _key_rows(mt, offs_t, t0, first, HAS_LAG: tl.constexpr):
    """The rows of a chunk (mask mt, first row t0 of the segment) whose lagged key exists (`_key_lag`)."""
    if HAS_LAG:
        return mt & (offs_t + t0 >= first)
    else:
        return mt


# Autotuned kernels must stay idempotent (each launch rewrites all of its outputs, never accumulates
# into them): the autotuner launches every config many times on the same buffers.
@triton.autotune(
    configs=_configs("chunk_state_kernel", "BK"),
    key=["DK", "DV", "BWD", "TUNE_BUCKET"],  # the backward variant holds 3 more row tiles: tune it separately
    # with ZDOT its second dot (the normalizer sums) has BK rows
    prune_configs_by={"early_config_prune": _pruner("BK", 1, 128,
                                                    state_rows=lambda kw: "BK" if kw.get("ZDOT") else None)},
)
@triton.jit
def chunk_state_kernel(
    x_ptr, y_ptr, o_ptr, rden_ptr, r_ptr, drden_ptr, g_ptr, delta_ptr, st_ptr, f_ptr,
    T, H, L, NS, scale, LAG, TUNE_BUCKET,
    DK: tl.constexpr, DV: tl.constexpr, FEATURE: tl.constexpr, NORMALIZE: tl.constexpr, BWD: tl.constexpr,
    HAS_DRDEN: tl.constexpr, HAS_DELTA: tl.constexpr, ZDOT: tl.constexpr, WRITE_F: tl.constexpr,
    HAS_LAG: tl.constexpr, DOT_MODE: tl.constexpr, FULL_CHUNKS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
):
    """One segment's local sum of phi(x)^T y (a BK-row tile of the DK x DV state, full V) and of the
    normalizer vector. Forward: x = k, y = v, vector = sum b. Backward: x = q, y = do * rden,
    vector = sum r a, with r computed here (it needs the full V row of do and o) and written out. With
    HAS_DRDEN, rden itself was used downstream (hybrid attention reads the denominator off it): its
    gradient drden adds d rden / d den * drden = -rden^2 drden to r. The backward, normalizing, also writes
    y as the dots take it, g = do * rden rounded to the dot dtype, to g_ptr for the dq/dk/dv kernels (which
    load it as is: no per-element scaling and conversion of a full-V tile in each of their programs).
    HAS_DELTA (backward): also writes delta = do . o per row (the hybrid's band kernels need it).
    ZDOT: the vector's sums as dots
    (`_row_sums`, see ZDOT above). LAG (forward only; 0 in the backward, whose x and y are query rows):
    x and y are read LAG rows back (`_key_lag`). WRITE_F (no LAG): also stores the features of x as the
    dots take them (b forward, a backward) to f_ptr ([B, T, H, DK], this program's BK columns), for the
    later kernels to read instead of k or q (op.py's `map_costs`)."""
    i_k, i_s, i_bh, rowk0, rowv0, trow0, t_len = _program(DK // BK, NS, L, T, H, DK, DV)
    lag_k, lag_v, first = _key_lag(i_s, L, LAG, H, DK, DV, HAS_LAG)
    offs_t = tl.arange(0, BT)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_dv = tl.arange(0, DV)
    tile_k = offs_t[:, None] * (H * DK) + offs_k[None, :]
    tile_dv = offs_t[:, None] * (H * DV) + offs_dv[None, :]
    x_base = x_ptr + rowk0 - lag_k
    y_base = y_ptr + rowv0 - lag_v
    o_base = o_ptr + rowv0
    g_base = g_ptr + rowv0
    f_base = f_ptr + rowk0
    acc = tl.zeros([BK, DV], dtype=tl.float32)
    vec = tl.zeros([BK], dtype=tl.float32)
    vec_w = tl.zeros([BK, ZW], dtype=tl.float32)  # ZDOT: the vector in each of its ZW equal columns
    for t0 in range(0, t_len, BT):
        mt = _chunk_rows(offs_t, t_len - t0, BT, FULL_CHUNKS)
        mx = _key_rows(mt, offs_t, t0, first, HAS_LAG)
        x = tl.load(x_base + tile_k, mask=mx[:, None], other=0.0)
        if NORMALIZE and not BWD and not ZDOT:  # only the plain sum of b needs its padding rows zeroed
            x_c = _features(x, mx, x_ptr, scale, FEATURE, DOT_MODE)
        else:  # they meet y = 0 in the state, and r = 0 or a zero weight in the vector's dots
            x_c = _features(x, None, x_ptr, scale, FEATURE, DOT_MODE)
        if WRITE_F:
            tl.store(f_base + tile_k, x_c.to(f_ptr.dtype.element_ty), mask=mt[:, None])
        y = tl.load(y_base + tile_dv, mask=mx[:, None], other=0.0)
        if NORMALIZE:
            if BWD:
                rd = tl.load(rden_ptr + trow0 + t0 + offs_t, mask=mt, other=0.0)
                o = tl.load(o_base + tile_dv, mask=mt[:, None], other=0.0)
                do_o = tl.sum(y.to(tl.float32) * o.to(tl.float32), axis=1)
                if HAS_DELTA and i_k == 0:
                    tl.store(delta_ptr + trow0 + t0 + offs_t, do_o, mask=mt)
                r = -do_o * rd
                if HAS_DRDEN:
                    r -= tl.load(drden_ptr + trow0 + t0 + offs_t, mask=mt, other=0.0) * rd * rd
                if i_k == 0:
                    tl.store(r_ptr + trow0 + t0 + offs_t, r, mask=mt)
                y_c = _cast(y.to(tl.float32) * rd[:, None], x_ptr, DOT_MODE)
                if i_k == 0:
                    tl.store(g_base + tile_dv, y_c, mask=mt[:, None])
                if ZDOT:
                    w = tl.broadcast_to(r[:, None], [BT, ZW])
                    vec_w = _row_sums(x_c, w, vec_w, x_ptr, DOT_MODE, False)
                else:
                    vec += tl.sum(x_c.to(tl.float32) * r[:, None], axis=0)
            else:
                y_c = _cast(y, x_ptr, DOT_MODE)
                if ZDOT:  # ones on the key rows, zeros on the padding rows
                    ones = tl.broadcast_to(tl.where(mx, 1.0, 0.0)[:, None], [BT, ZW])
                    vec_w = _row_sums(x_c, ones, vec_w, x_ptr, DOT_MODE, True)
                else:
                    vec += tl.sum(x_c.to(tl.float32), axis=0)
        else:
            y_c = _cast(y, x_ptr, DOT_MODE)
        acc += _dot(tl.trans(x_c), y_c, DOT_MODE)
        x_base += BT * H * DK
        y_base += BT * H * DV
        o_base += BT * H * DV
        g_base += BT * H * DV
        f_base += BT * H * DK
    base = st_ptr + (i_bh * (NS + 1) + i_s) * (DK * DV + DK)
    tl.store(base + offs_k[:, None] * DV + offs_dv[None, :], acc)
    if ZDOT:
        vec = tl.sum(vec_w, axis=1) * (1.0 / ZW)  # ZW equal columns: their mean is exact
    tl.store(base + DK * DV + offs_k, vec)


@triton.jit
def scan_kernel(st_ptr, NS, M, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """In place over states [BH, NS+1, M]: entry s becomes the sum of the entries before it (after it when
    REVERSE); entry NS becomes the total. In place, so launched exactly once: never autotune it."""
    n_blk = tl.cdiv(M, BLOCK)
    pid = tl.program_id(0).to(tl.int64)
    i_bh = pid // n_blk
    offs = (pid % n_blk) * BLOCK + tl.arange(0, BLOCK)
    m = offs < M
    run = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, NS):
        if REVERSE:
            s = NS - 1 - j
        else:
            s = j
        p = st_ptr + (i_bh * (NS + 1) + s) * M + offs
        x = tl.load(p, mask=m, other=0.0)
        tl.store(p, run, mask=m)
        run += x
    tl.store(st_ptr + (i_bh * (NS + 1) + NS) * M + offs, run, mask=m)


@triton.autotune(
    configs=_configs("fwd_kernel", "BV"),
    key=["DK", "DV", "TUNE_BUCKET"],
    prune_configs_by={"early_config_prune": _pruner("BV", 1, 128, state_rows="full",
                                                    whole_row_groups=lambda kw: kw.get("ZDOT"))},
)
@triton.jit
def fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, rden_ptr, st_ptr,
    T, H, L, NS, eps, scale, LAG, TUNE_BUCKET,
    DK: tl.constexpr, DV: tl.constexpr, FEATURE: tl.constexpr, NORMALIZE: tl.constexpr, CAUSAL: tl.constexpr,
    ZDOT: tl.constexpr, HAS_LAG: tl.constexpr, DOT_MODE: tl.constexpr, FULL_CHUNKS: tl.constexpr,
    PHI_K: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
):
    """Outputs of one segment for one V-tile: o = (a S_prev + tril(a b^T) v) / (a z_prev + rowsum + eps),
    chunk by chunk, S (DK x BV) and z carried in registers. Without CAUSAL, o = a S_total / (a z_total + eps).
    ZDOT: the normalizer as tensor-core dots (see ZDOT above): z carried as [DK, ZW] equal columns (its
    column sums a dot), a . z a dot of the rounded features with z rounded to the dot dtype (which moves
    den by ~2^-9 / sqrt(DK) relative, under the features' own rounding), the within-chunk sums a dot of
    the rounded scores (those num uses); den read off den_w's equal columns once a chunk. No fp32
    feature tile stays live. Session 24 measured this on the H100 before the keys came as features:
    fwd_kernel 1.83 -> 1.56 ms at 128k (D = 128), but an illegal address while autotuning at D = 64
    (gpu_single.sh zdotfwdcfg forces one config per process to find which).
    Without ZDOT, a . z and z's sums take the fp32 features, before their rounding to the dot dtype:
    summing the rounded copy unpacked it to fp32 again and kept ptxas from packing the features in pairs
    (static SASS per loop 1943 -> 1691). The normalizer then differs from one of rounded features by
    ~2^-9 / sqrt(DK) relative, far inside the bf16 rounding of o.
    LAG: keys and values read LAG rows back (`_key_lag`; causal only). PHI_K: the map applied to the keys
    as loaded, FEATURE or FEATURE_GIVEN (k_ptr holds the features chunk_state_kernel wrote: none to
    compute; static sm_90 SASS per chunk 1691 -> 1358 at (64, 64, 4, 2), elu+1)."""
    i_v, i_s, i_bh, rowk0, rowv0, trow0, t_len = _program(DV // BV, NS, L, T, H, DK, DV)
    lag_k, lag_v, first = _key_lag(i_s, L, LAG, H, DK, DV, HAS_LAG)
    offs_t = tl.arange(0, BT)
    offs_dk = tl.arange(0, DK)
    offs_v = i_v * BV + tl.arange(0, BV)
    tile_dk = offs_t[:, None] * (H * DK) + offs_dk[None, :]
    tile_v = offs_t[:, None] * (H * DV) + offs_v[None, :]
    causal = offs_t[:, None] >= offs_t[None, :]
    if CAUSAL:
        seg = i_s
    else:
        seg = NS
    base = st_ptr + (i_bh * (NS + 1) + seg) * (DK * DV + DK)
    S = tl.load(base + offs_dk[:, None] * DV + offs_v[None, :])
    z = tl.zeros([DK], dtype=tl.float32)
    if NORMALIZE:
        z = tl.load(base + DK * DV + offs_dk)
    Zc = tl.zeros([DK, ZW], dtype=tl.float32) + z[:, None]  # ZDOT's z, in every column
    ones = tl.full([BT, ZW], 1.0, tl.float32)
    q_base = q_ptr + rowk0
    k_base = k_ptr + rowk0 - lag_k
    v_base = v_ptr + rowv0 - lag_v
    o_base = o_ptr + rowv0
    for t0 in range(0, t_len, BT):
        mt = _chunk_rows(offs_t, t_len - t0, BT, FULL_CHUNKS)
        if ZDOT:  # a . z as a dot of the rounded features: every column of den_w holds it
            a_c = _features(tl.load(q_base + tile_dk, mask=mt[:, None], other=0.0), None, q_ptr, scale, FEATURE, DOT_MODE)
            if NORMALIZE:
                den_w = _dot(a_c, _cast(Zc, q_ptr, DOT_MODE), DOT_MODE)
        else:
            a32 = _phi(tl.load(q_base + tile_dk, mask=mt[:, None], other=0.0), scale, FEATURE)
            if NORMALIZE:  # a row reduction (within a warp's threads): no dot needed
                den = tl.sum(a32 * z[None, :], axis=1)
            a_c = _cast(a32, q_ptr, DOT_MODE)
        num = _dot(a_c, _cast(S, q_ptr, DOT_MODE), DOT_MODE)
        if CAUSAL:
            mk = _key_rows(mt, offs_t, t0, first, HAS_LAG)
            b32 = _phi(tl.load(k_base + tile_dk, mask=mk[:, None], other=0.0), scale, PHI_K)
            b32 = tl.where(mk[:, None], b32, 0.0)
            b_c = _cast(b32, q_ptr, DOT_MODE)
            v_c = _cast(tl.load(v_base + tile_v, mask=mk[:, None], other=0.0), q_ptr, DOT_MODE)
            A = tl.where(causal, _dot(a_c, tl.trans(b_c), DOT_MODE), 0.0)
            A_c = _cast(A, q_ptr, DOT_MODE)
            num += _dot(A_c, v_c, DOT_MODE)
            S += _dot(tl.trans(b_c), v_c, DOT_MODE)
            if NORMALIZE:
                if ZDOT:  # the within-chunk sums and z's column sums as dots too
                    den_w += _dot(A_c, _cast(ones, q_ptr, DOT_MODE), DOT_MODE)
                    Zc = _row_sums(b_c, ones, Zc, q_ptr, DOT_MODE, True)
                else:
                    den += tl.sum(A, axis=1)
                    z += tl.sum(b32, axis=0)
        if NORMALIZE:
            if ZDOT:
                den = tl.sum(den_w, axis=1) * (1.0 / ZW)  # ZW equal columns: their mean is exact
            rd = 1.0 / (den + tl.cast(eps, tl.float32))  # (fp64 when traced: see _phi)
            num = num * rd[:, None]
            if i_v == 0:
                tl.store(rden_ptr + trow0 + t0 + offs_t, rd, mask=mt)
        tl.store(o_base + tile_v, num.to(o_ptr.dtype.element_ty), mask=mt[:, None])
        q_base += BT * H * DK
        k_base += BT * H * DK
        v_base += BT * H * DV
        o_base += BT * H * DV


@triton.autotune(
    configs=_configs("bwd_dqdk_kernel", "BK"),
    key=["DK", "DV", "PART", "TUNE_BUCKET"],
    prune_configs_by={"early_config_prune": _pruner("BK", lambda kw: 2 if kw.get("PART", 0) == 0 else 1, 128, state_rows="BK")},
)
@triton.jit
def bwd_dqdk_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, r_ptr, st_ptr, dst_ptr, dq_ptr, dk_ptr, f_ptr,
    T, H, L, NS, scale, LAG, TUNE_BUCKET,
    DK: tl.constexpr, DV: tl.constexpr, FEATURE: tl.constexpr, NORMALIZE: tl.constexpr, CAUSAL: tl.constexpr,
    ZDOT: tl.constexpr, HAS_LAG: tl.constexpr, DOT_MODE: tl.constexpr, FULL_CHUNKS: tl.constexpr, PART: tl.constexpr,
    INTRA: tl.constexpr, PHI_Q: tl.constexpr, PHI_K: tl.constexpr, WRITE_F: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr,
):
    """dq and dk for one K-tile of one segment:
      da = g S_prev^T + r z_prev + tril(g v^T + r) b          (contracts over V: full V here)
      db = v dS_next^T + dz_next + tril(g v^T + r)^T a
    PART: 0 both, 1 dq only, 2 dk only. Apart, each launch holds one state instead of two, so it can take
    wider K tiles: fewer programs recompute the [BT, BT] scores g v^T, which contract over all of V.
    dS_next accumulates a^T g over the chunks in reverse order from the suffix of the later segments.
    S_prev: PART 1 sweeps the chunks forward from the segment's prefix (S += b^T v after each chunk, as the
    forward does). PART 0 must go in reverse for dS, so it walks S backwards from the prefix of the next
    segment (S -= b^T v): each subtraction leaves rounding of the size of the larger state, so the first
    rows' dq lose precision in proportion to the segment length (in fp32: ~7x PyTorch's error at 640
    tokens; hidden by bf16's own error). ZDOT: the sums into z and dz as tensor-core dots (carried as
    [BK, ZW] equal columns, read back as their mean where used; see ZDOT above). LAG: k and v read, dk
    stored, LAG rows back (`_key_lag`; causal only). g_ptr: g as the dots take it (do * rden written by the
    backward chunk_state_kernel when normalizing, do otherwise). INTRA off (causal): no tril(...) terms,
    i.e. query t sees the keys of earlier chunks only (`with_chunk` sets the chunks). PHI_Q, PHI_K: the
    maps applied to q and to k as loaded, FEATURE or FEATURE_GIVEN (features written by an earlier
    kernel); phi' and the scale of dq and dk still follow FEATURE. WRITE_F: also stores the key features
    b as the dots take them to f_ptr (at the rows dk goes to), for the launches after this one."""
    i_k, i_s, i_bh, rowk0, rowv0, trow0, t_len = _program(DK // BK, NS, L, T, H, DK, DV)
    lag_k, lag_v, first = _key_lag(i_s, L, LAG, H, DK, DV, HAS_LAG)
    offs_t = tl.arange(0, BT)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_dv = tl.arange(0, DV)
    tile_k = offs_t[:, None] * (H * DK) + offs_k[None, :]
    tile_dv = offs_t[:, None] * (H * DV) + offs_dv[None, :]
    causal = offs_t[:, None] >= offs_t[None, :]
    M = DK * DV + DK
    if CAUSAL:
        fseg = i_s + 1
        if PART == 1:
            fseg = i_s
        bseg = i_s
    else:
        fseg = NS
        bseg = NS
    fbase = st_ptr + (i_bh * (NS + 1) + fseg) * M
    bbase = dst_ptr + (i_bh * (NS + 1) + bseg) * M
    if PART != 2:
        S = tl.load(fbase + offs_k[:, None] * DV + offs_dv[None, :])
        z = tl.zeros([BK], dtype=tl.float32)
        if NORMALIZE:
            z = tl.load(fbase + DK * DV + offs_k)
    if PART != 1:
        dS = tl.load(bbase + offs_k[:, None] * DV + offs_dv[None, :])
        dz = tl.zeros([BK], dtype=tl.float32)
        if NORMALIZE:
            dz = tl.load(bbase + DK * DV + offs_k)
        dZw = tl.zeros([BK, ZW], dtype=tl.float32) + dz[:, None]  # ZDOT's dz
    if PART != 2:
        Zw = tl.zeros([BK, ZW], dtype=tl.float32) + z[:, None]  # ZDOT's z
    n_blk = tl.cdiv(t_len, BT)
    for j in range(0, n_blk):
        if PART == 1:
            t0 = j * BT
        else:
            t0 = (n_blk - 1 - j) * BT
        off_k = rowk0 + t0.to(tl.int64) * (H * DK)
        off_v = rowv0 + t0.to(tl.int64) * (H * DV)
        mt = _chunk_rows(offs_t, t_len - t0, BT, FULL_CHUNKS)
        mk = _key_rows(mt, offs_t, t0, first, HAS_LAG)
        k_c = tl.load(k_ptr + off_k - lag_k + tile_k, mask=mk[:, None], other=0.0)
        if HAS_LAG or (NORMALIZE and not ZDOT):  # lagged keys' missing rows meet dA in da; the plain z sums
            b_c = _features(k_c, mk, q_ptr, scale, PHI_K, DOT_MODE)
        else:  # padding rows meet v = 0, dA = 0 (do, r = 0 on those rows) and ZDOT's zero weights
            b_c = _features(k_c, None, q_ptr, scale, PHI_K, DOT_MODE)
        if WRITE_F:
            tl.store(f_ptr + off_k - lag_k + tile_k, b_c.to(f_ptr.dtype.element_ty), mask=mk[:, None])
        if ZDOT:
            ones = tl.broadcast_to(tl.where(mk, 1.0, 0.0)[:, None], [BT, ZW])
        v_c = _cast(tl.load(v_ptr + off_v - lag_v + tile_dv, mask=mk[:, None], other=0.0), q_ptr, DOT_MODE)
        if CAUSAL and PART == 0:
            S -= _dot(tl.trans(b_c), v_c, DOT_MODE)
            if NORMALIZE:
                if ZDOT:
                    Zw = _row_sums(b_c, -ones, Zw, q_ptr, DOT_MODE, True)
                else:
                    z -= tl.sum(b_c.to(tl.float32), axis=0)
        g_c = _cast(tl.load(g_ptr + off_v + tile_dv, mask=mt[:, None], other=0.0), q_ptr, DOT_MODE)
        if NORMALIZE:
            rr = tl.load(r_ptr + trow0 + t0 + offs_t, mask=mt, other=0.0)
        if CAUSAL and INTRA:
            dA = _dot(g_c, tl.trans(v_c), DOT_MODE)
            if NORMALIZE:
                dA += rr[:, None]
            dA_c = _cast(tl.where(causal, dA, 0.0), q_ptr, DOT_MODE)
        a_c = _features(tl.load(q_ptr + off_k + tile_k, mask=mt[:, None], other=0.0), None, q_ptr, scale, PHI_Q,
                        DOT_MODE)
        if PART != 2:  # dq
            da = _dot(g_c, tl.trans(_cast(S, q_ptr, DOT_MODE)), DOT_MODE)
            if NORMALIZE:
                if ZDOT:
                    z = tl.sum(Zw, axis=1) * (1.0 / ZW)
                da += rr[:, None] * z[None, :]
            if CAUSAL and INTRA:
                da += _dot(dA_c, b_c, DOT_MODE)
            if FEATURE != 0:
                da = da * _dphi(a_c, FEATURE)
            tl.store(dq_ptr + off_k + tile_k, (da * tl.cast(scale, tl.float32)).to(dq_ptr.dtype.element_ty), mask=mt[:, None])
        if CAUSAL and PART == 1:
            S += _dot(tl.trans(b_c), v_c, DOT_MODE)
            if NORMALIZE:
                if ZDOT:
                    Zw = _row_sums(b_c, ones, Zw, q_ptr, DOT_MODE, True)
                else:
                    z += tl.sum(b_c.to(tl.float32), axis=0)
        if PART != 1:  # dk
            db = _dot(v_c, tl.trans(_cast(dS, q_ptr, DOT_MODE)), DOT_MODE)
            if NORMALIZE:
                if ZDOT:
                    dz = tl.sum(dZw, axis=1) * (1.0 / ZW)
                db += dz[None, :]
            if CAUSAL and INTRA:
                db += _dot(tl.trans(dA_c), a_c, DOT_MODE)
            if FEATURE != 0:
                db = db * _dphi(b_c, FEATURE)
            tl.store(dk_ptr + off_k - lag_k + tile_k, (db * tl.cast(scale, tl.float32)).to(dk_ptr.dtype.element_ty), mask=mk[:, None])
        if CAUSAL and PART != 1:
            dS += _dot(tl.trans(a_c), g_c, DOT_MODE)
            if NORMALIZE:
                if ZDOT:
                    dZw = _row_sums(a_c, tl.broadcast_to(rr[:, None], [BT, ZW]), dZw, q_ptr, DOT_MODE, False)
                else:
                    dz += tl.sum(a_c.to(tl.float32) * rr[:, None], axis=0)


@triton.autotune(
    configs=_configs("bwd_dv_kernel", "BV"),
    key=["DK", "DV", "TUNE_BUCKET"],
    prune_configs_by={"early_config_prune": _pruner("BV", 1, 128, state_rows="full")},
)
@triton.jit
def bwd_dv_kernel(
    q_ptr, k_ptr, g_ptr, dst_ptr, dv_ptr,
    T, H, L, NS, scale, LAG, TUNE_BUCKET,
    DK: tl.constexpr, DV: tl.constexpr, FEATURE: tl.constexpr, NORMALIZE: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_LAG: tl.constexpr, DOT_MODE: tl.constexpr, FULL_CHUNKS: tl.constexpr, INTRA: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr,
):
    """dv for one V-tile of one segment, chunks in reverse: dv = b dS_next + tril(a b^T)^T g
    (contracts over K: full K here); dS_next (DK x BV) accumulates a^T g. LAG: k read and dv stored LAG
    rows back (`_key_lag`; causal only). g_ptr: g as in bwd_dqdk_kernel. (NORMALIZE is unused here: g
    carries the normalizer.) INTRA off: no tril term, as in bwd_dqdk_kernel."""
    i_v, i_s, i_bh, rowk0, rowv0, trow0, t_len = _program(DV // BV, NS, L, T, H, DK, DV)
    lag_k, lag_v, first = _key_lag(i_s, L, LAG, H, DK, DV, HAS_LAG)
    offs_t = tl.arange(0, BT)
    offs_dk = tl.arange(0, DK)
    offs_v = i_v * BV + tl.arange(0, BV)
    tile_dk = offs_t[:, None] * (H * DK) + offs_dk[None, :]
    tile_v = offs_t[:, None] * (H * DV) + offs_v[None, :]
    causal_t = offs_t[:, None] <= offs_t[None, :]  # [s, t]: s <= t
    if CAUSAL:
        seg = i_s
    else:
        seg = NS
    dS = tl.load(dst_ptr + (i_bh * (NS + 1) + seg) * (DK * DV + DK) + offs_dk[:, None] * DV + offs_v[None, :])
    n_blk = tl.cdiv(t_len, BT)
    last_k = (n_blk - 1).to(tl.int64) * (BT * H * DK)
    last_v = (n_blk - 1).to(tl.int64) * (BT * H * DV)
    q_base = q_ptr + rowk0 + last_k
    k_base = k_ptr + rowk0 - lag_k + last_k
    g_base = g_ptr + rowv0 + last_v
    dv_base = dv_ptr + rowv0 - lag_v + last_v
    for j in range(0, n_blk):
        t0 = (n_blk - 1 - j) * BT
        mt = _chunk_rows(offs_t, t_len - t0, BT, FULL_CHUNKS)
        mk = _key_rows(mt, offs_t, t0, first, HAS_LAG)
        # unmasked: rows without a key only reach dv rows that are not stored
        b_c = _features(tl.load(k_base + tile_dk, mask=mk[:, None], other=0.0), None, q_ptr, scale, FEATURE, DOT_MODE)
        dv = _dot(b_c, _cast(dS, q_ptr, DOT_MODE), DOT_MODE)
        if CAUSAL:
            a_c = _features(tl.load(q_base + tile_dk, mask=mt[:, None], other=0.0), None, q_ptr, scale, FEATURE, DOT_MODE)
            g_c = _cast(tl.load(g_base + tile_v, mask=mt[:, None], other=0.0), q_ptr, DOT_MODE)
            if INTRA:
                At = tl.where(causal_t, _dot(b_c, tl.trans(a_c), DOT_MODE), 0.0)
                dv += _dot(_cast(At, q_ptr, DOT_MODE), g_c, DOT_MODE)
            dS += _dot(tl.trans(a_c), g_c, DOT_MODE)
        tl.store(dv_base + tile_v, dv.to(dv_ptr.dtype.element_ty), mask=mk[:, None])
        q_base -= BT * H * DK
        k_base -= BT * H * DK
        g_base -= BT * H * DV
        dv_base -= BT * H * DV
