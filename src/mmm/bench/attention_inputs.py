"""Real attention inputs for the bench's quality column: q, k, v of an attention layer of a small causal
language model trained here, briefly, on the byte-level source of the Python standard library.

Why: an approximation's error depends on its inputs. Gaussian q/k give nearly flat attention, which
any approximation matches well; a trained layer attends sharply (previous tokens, brackets, names),
which is what an approximation has to reproduce in a real model.

How (once per process and model size, cached in memory, seeded):
1. Text: the stdlib's *.py files in a seeded shuffled order, joined with a 0 byte. The first files make
   the training stream; the files after them, never trained on, make the held-out text whose q/k/v are
   captured.
2. Model: `mmm.models.GPT` with 2 layers, exact attention, and heads x head_dim equal to the bench
   case's (full: 16 x 128, d_model 2048; quick: 2 x 32, d_model 64), so no expansion of shapes is ever
   needed. Trained with mmm.train's optimizer and learning-rate schedule (AdamW, warmup + cosine) for a
   short budget: 200 steps of 8 x 1024 tokens at full size (bf16 autocast on CUDA), 60 steps of
   8 x 128 tokens quick (a few seconds on a CPU). Lengths past the training length are real inputs of
   the same layer, on positions it never trained on.
3. Capture: the held-out text (length T) through the model; q, k (after the rotary positions) and v of
   the last layer's attention, [1, T, heads, head_dim], as that layer computes them.
   `training_qkv` captures the same layer on the start of the training text instead: what a map fitted
   to this layer (Hedgehog) trains on, so that it is then judged on text it has not seen.

The model is causal, so the q/k/v of the first T' < T tokens do not depend on the tokens after them:
a capture at the longest length also serves every shorter one (its prefix).
"""

from __future__ import annotations

import random
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .timing import canonical_device

CAPTURE_LAYER = -1  # the last layer: its inputs have been through attention already


@dataclass(frozen=True)
class ModelSpec:
    heads: int
    head_dim: int
    layers: int = 2
    seq_len: int = 1024  # training sequence length
    batch: int = 8
    steps: int = 200
    lr: float = 1e-3
    warmup: int = 20
    train_bytes: int = 8 * 2**20  # size of the training stream (read from the first files)
    seed: int = 0

    def describe(self) -> str:
        return (f"{self.layers}-layer byte-level GPT, {self.heads} heads x {self.head_dim} (d_model "
                f"{self.heads * self.head_dim}), trained {self.steps} steps x {self.batch} x {self.seq_len} tokens "
                f"on Python {sysconfig.get_python_version()} stdlib sources")


FULL_SPEC = ModelSpec(heads=16, head_dim=128, lr=8e-4)
QUICK_SPEC = ModelSpec(heads=2, head_dim=32, seq_len=128, batch=8, steps=60, lr=5e-3, warmup=10, train_bytes=2**19)


@dataclass
class RealQKV:
    """q, k, v [1, T, heads, head_dim] of one trained attention layer on held-out text, and how they were made."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    info: dict = field(default_factory=dict)


def stdlib_files(seed: int = 0) -> list[Path]:
    """The stdlib's *.py files (site-packages excluded) in a seeded shuffled order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts and p.is_file())
    if not files:
        raise FileNotFoundError(f"no *.py files under the standard library at {root}; real attention inputs need them")
    random.Random(seed).shuffle(files)
    return files


def read_stream(files: list[Path], start: int, n_bytes: int) -> tuple[np.ndarray, int]:
    """Bytes of files[start:], each followed by a 0 byte (end of document), until at least n_bytes;
    returns (uint8 tokens, index of the first file not read)."""
    parts, total, i = [], 0, start
    while total < n_bytes:
        if i == len(files):
            raise ValueError(f"the stdlib holds fewer than the {n_bytes} bytes needed past file {start}")
        data = files[i].read_bytes() + b"\x00"
        parts.append(data)
        total += len(data)
        i += 1
    return np.frombuffer(b"".join(parts), dtype=np.uint8), i


class _Trained:
    """A trained model and its text streams (one per spec and device, see `trained_model`)."""

    def __init__(self, model, files: list[Path], first_heldout: int, info: dict):
        self.model, self.files, self.first_heldout, self.info = model, files, first_heldout, info
        self.capture: RealQKV | None = None  # the longest held-out capture so far
        self.train_capture: RealQKV | None = None  # the longest training-text capture so far


_TRAINED: dict[tuple[ModelSpec, str], _Trained] = {}


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, mininterval=0.5 if sys.stderr.isatty() else 30.0)


def trained_model(spec: ModelSpec, device: torch.device | str) -> _Trained:
    """Train the spec's model on `device` (first call per process only; later calls return the cache)."""
    from ..models import GPT, GPTConfig
    from ..train.data import BatchSampler
    from ..train.loop import TrainConfig, autocast, learning_rate, make_optimizer

    device = canonical_device(device)
    key = (spec, str(device))
    if key in _TRAINED:
        return _TRAINED[key]
    files = stdlib_files(spec.seed)
    tokens, first_heldout = read_stream(files, 0, spec.train_bytes)
    # max_seq_len only bounds the rotary positions, computed on the fly: set it high enough for any capture
    cfg = GPTConfig(d_model=spec.heads * spec.head_dim, n_heads=spec.heads, n_layers=spec.layers, max_seq_len=2**21)
    run = TrainConfig(model=cfg, batch_size=spec.batch, seq_len=spec.seq_len, steps=spec.steps, lr=spec.lr,
                      warmup=spec.warmup, seed=spec.seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(spec.seed)
        model = GPT(cfg).to(device)
        optimizer = make_optimizer(model, run, device)
        sampler = BatchSampler(tokens, spec.batch, spec.seq_len, spec.seed)
        losses, start = [], time.perf_counter()
        bar = _bar(spec.steps, "training the model for real attention inputs")
        model.train()
        for step in range(spec.steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(run, step, 0.0)
            x, y = next(sampler)
            with autocast(device):
                _, loss = model(x.to(device), y.to(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), run.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix_str(f"loss {losses[-1]:.3f}", refresh=False)  # refresh=True would ignore mininterval
        bar.close()
    model.eval().requires_grad_(False)
    tail = max(1, spec.steps // 10)
    info = {"model": spec.describe(), "params": model.num_params(), "train_seconds": round(time.perf_counter() - start, 1),
            "train_loss_first": round(losses[0], 3), "train_loss_last": round(float(np.mean(losses[-tail:])), 3)}
    _TRAINED[key] = _Trained(model, files, first_heldout, info)
    return _TRAINED[key]


class _Captured(Exception):
    """Stops the model's forward once the captured layer has its inputs (nothing after it is needed)."""


@torch.no_grad()
def capture_qkv(model, tokens: torch.Tensor, layer: int = CAPTURE_LAYER) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, T, heads, head_dim] of `model.blocks[layer]`'s attention for tokens [B, T], computed as
    that layer computes them (its projections, then the rotary positions on q and k), in the dtype the
    model runs in (bf16 autocast on CUDA, as trained)."""
    from ..models.gpt import rotary
    from ..train.loop import autocast

    attn = model.blocks[layer].attn
    got: dict[str, torch.Tensor] = {}

    def hook(module, args):
        x, cos, sin = args[:3]  # Attention.forward(x, cos, sin, cache)
        shape = (*x.shape[:2], module.cfg.n_heads, module.cfg.head_dim)
        got["q"] = rotary(module.q(x).view(shape), cos, sin)
        got["k"] = rotary(module.k(x).view(shape), cos, sin)
        got["v"] = module.v(x).view(shape)
        raise _Captured

    handle = attn.register_forward_pre_hook(hook)
    try:
        with autocast(tokens.device):
            model(tokens)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not got:
        raise RuntimeError(f"layer {layer}'s attention was not called by the model's forward; cannot capture q/k/v")
    return got["q"], got["k"], got["v"]


def _check_length(seq_len) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")


def _capture(trained: _Trained, first_file: int, seq_len: int, split: str) -> RealQKV:
    """q, k, v of the trained model's last layer on seq_len bytes of the stream from files[first_file:]."""
    text, end = read_stream(trained.files, first_file, seq_len)
    tokens = torch.from_numpy(text[:seq_len].astype(np.int64))[None].to(next(trained.model.parameters()).device)
    q, k, v = capture_qkv(trained.model, tokens)
    info = {**trained.info, "layer": f"{len(trained.model.blocks) - 1} (last) of {len(trained.model.blocks)}",
            "text": f"{end - first_file} {split} stdlib file(s) joined, {seq_len} bytes",
            "shape": list(q.shape), "dtype": str(q.dtype).removeprefix("torch.")}
    return RealQKV(q, k, v, info)


def _prefix(c: RealQKV, seq_len: int) -> RealQKV:
    return RealQKV(c.q[:, :seq_len], c.k[:, :seq_len], c.v[:, :seq_len], {**c.info, "shape": [1, seq_len, *c.q.shape[2:]]})


def real_qkv(seq_len: int, quick: bool, device: torch.device | str) -> RealQKV:
    """q, k, v [1, seq_len, H, D] of the trained model's last attention layer on held-out stdlib text
    (H x D = 2 x 32 quick, 16 x 128 full size). Trains the model on first use; captures at the longest
    length asked for so far and returns prefixes of it (exact: the model is causal)."""
    _check_length(seq_len)
    trained = trained_model(QUICK_SPEC if quick else FULL_SPEC, device)
    if trained.capture is None or trained.capture.q.shape[1] < seq_len:
        trained.capture = _capture(trained, trained.first_heldout, seq_len, "held-out")
    return _prefix(trained.capture, seq_len)


def training_qkv(seq_len: int, quick: bool, device: torch.device | str) -> RealQKV:
    """As `real_qkv`, but on the start of the text the model trained on (never the held-out files):
    inputs to fit something to this layer with, before judging it on `real_qkv`."""
    _check_length(seq_len)
    spec = QUICK_SPEC if quick else FULL_SPEC
    if seq_len > spec.train_bytes:
        raise ValueError(f"seq_len must be at most the training stream's {spec.train_bytes} bytes, got {seq_len}")
    trained = trained_model(spec, device)
    if trained.train_capture is None or trained.train_capture.q.shape[1] < seq_len:
        trained.train_capture = _capture(trained, 0, seq_len, "training")
    return _prefix(trained.train_capture, seq_len)
