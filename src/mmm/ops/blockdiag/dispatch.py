"""Which implementation runs a block-diagonal or Monarch product on CUDA: the Triton kernels or cuBLAS.

Paths: "triton" (kernels.py; the shuffle in the addressing, fused small-block backward), "cublas"
(cublas.py / ../monarch/cublas.py: strided-batched GEMMs, no copies; for Monarch the shuffle GEMM is split
into b calls), for Monarch only "cublas_copy" (one bmm and one permute copy per shuffle), and
"reference" (the plain PyTorch bmm + permute, autograd backward). The last can win where the GEMMs are
short: at n = 8192, d = 4096 the H200 run of 2026-11-28 measured it fastest for every block shape, as the
custom ops' per-call overhead (dispatcher, autograd function) is then a visible share of ~0.1 ms GEMMs.

The choice is read from `dispatch_table.json` beside this file, measured on a GPU by
scripts/gpu_block_paths.py (which writes the file to copy here) and keyed on
(structure, in_features, out_features, nblocks, block_rank, dtype) plus a power-of-two token bucket.
A shape in the table uses its nearest measured bucket within a factor of 4 of the token count; any other
shape uses `default_path`, a rule that is a default until measured:
  - cuBLAS when every block GEMM is at least CUBLAS_MIN_BLOCK wide in each weight dimension (in/b and
    out/b; for Monarch also the middle width b*c, the K of stage 2 and the N of stage 1). The one
    H200 run so far (results/h200/2026-11-28-*) had torch.compile of the bmm reference beat the Triton
    kernels at blocks of 1024 and 4096 (block-diagonal b=4, 16 and Monarch b=4, 16 at d=16384), and the
    Triton kernels win where blocks are small (Monarch b=128: rank-1 blocks of 128).
  - For Monarch, "cublas" (split shuffle) when the block rank is at least SPLIT_MIN_RANK, else
    "cublas_copy": the split re-reads the other operand b times, which only large blocks hide.
The table is loaded once at import (plain data: torch.compile traces the lookup without a graph break).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TABLE_FILE = Path(__file__).with_name("dispatch_table.json")
PATHS = {"blockdiag": ("triton", "cublas", "reference"), "monarch": ("triton", "cublas", "cublas_copy", "reference")}
CUBLAS_MIN_BLOCK = 1024
SPLIT_MIN_RANK = 512
# A measured bucket applies to token counts within this factor of it (launch overheads and tile counts
# change the answer far from the measured size).
BUCKET_REACH = 4

Key = tuple  # (structure, in_features, out_features, nblocks, block_rank or None, dtype name)


def token_bucket(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    bucket = 1
    while bucket < n:
        bucket *= 2
    return bucket


_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.float64: "float64"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]  # a dict lookup rather than str(): traceable by torch.compile


def load_table(path: str | Path) -> dict[Key, dict[int, str]]:
    """{shape key: {token bucket: path}} from a table file (see scripts/gpu_block_paths.py)."""
    doc = json.loads(Path(path).read_text())
    table: dict[Key, dict[int, str]] = {}
    for i, e in enumerate(doc.get("entries", [])):
        structure = e["structure"]
        if structure not in PATHS or e["path"] not in PATHS[structure]:
            raise ValueError(f"{path}: entry {i} has structure {structure!r} / path {e['path']!r}; "
                             f"expected one of {PATHS}")
        key = (structure, int(e["in_features"]), int(e["out_features"]), int(e["nblocks"]),
               None if e.get("block_rank") is None else int(e["block_rank"]), e["dtype"])
        table.setdefault(key, {})[token_bucket(int(e["tokens"]))] = e["path"]
    return table


TABLE = load_table(TABLE_FILE)


def default_path(structure: str, in_features: int, out_features: int, nblocks: int,
                 block_rank: int | None = None) -> str:
    """The rule for shapes without a measurement (see the module docstring)."""
    widths = [in_features // nblocks, out_features // nblocks]
    if structure == "monarch":
        widths.append(nblocks * block_rank)
    if min(widths) < CUBLAS_MIN_BLOCK:
        return "triton"
    return _cublas_variant(structure, block_rank)


def _cublas_variant(structure: str, block_rank: int | None) -> str:
    if structure == "monarch" and block_rank < SPLIT_MIN_RANK:
        return "cublas_copy"
    return "cublas"


def measured_path(structure: str, in_features: int, out_features: int, nblocks: int, block_rank: int | None,
                  dtype, num_tokens: int, table: dict | None = None) -> str | None:
    """The measured fastest path for this shape at the nearest token bucket within BUCKET_REACH, or None."""
    table = TABLE if table is None else table
    buckets = table.get((structure, in_features, out_features, nblocks, block_rank, dtype_name(dtype)))
    if not buckets:
        return None
    want = token_bucket(num_tokens)
    best = None
    for bucket, path in buckets.items():
        ratio = max(bucket, want) // min(bucket, want)
        if ratio <= BUCKET_REACH and (best is None or ratio < best[0] or (ratio == best[0] and bucket > best[1])):
            best = (ratio, bucket, path)
    return None if best is None else best[2]


def pick(structure: str, in_features: int, out_features: int, nblocks: int, block_rank: int | None, dtype,
         num_tokens: int, triton_ok: bool) -> str:
    """The path for a CUDA call: measured, else the default rule; cuBLAS when Triton cannot run."""
    path = measured_path(structure, in_features, out_features, nblocks, block_rank, dtype, num_tokens)
    path = path or default_path(structure, in_features, out_features, nblocks, block_rank)
    if path == "triton" and not triton_ok:
        return _cublas_variant(structure, block_rank)
    return path
