"""The training loop: AdamW, warmup + cosine learning rate, gradient clipping, bf16 autocast on CUDA,
optional torch.compile, periodic validation, atomic checkpoints and exact resume.

Outputs in `out/`: checkpoint.safetensors (every `ckpt_every` steps and at the end), log.json (config,
per-step loss / lr / time, validation points, throughput) and loss.png.

Exact resume: the batch of a step is a pure function of (seed, step), the learning rate a pure function
of the step (or of the training seconds under a time budget), and the checkpoint holds model, optimizer,
RNG and history. So a run killed after step s and resumed computes the same losses as one that never
stopped (bit-identical on CPU in fp32).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..models.gpt import GPT, GPTConfig
from . import checkpoint as ckpt
from .data import BatchSampler, Corpus, gather, load_corpus, val_offsets
from .distributed import Dist, mean_across_ranks, setup, teardown, wrap

CHECKPOINT_NAME = "checkpoint.safetensors"


@dataclass
class TrainConfig:
    model: GPTConfig = field(default_factory=GPTConfig)
    data: list[str] | None = None  # None: the Python stdlib corpus
    out: str = "runs/train"
    batch_size: int = 16  # global batch, in sequences (split across ranks)
    seq_len: int = 256
    steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 100  # steps of linear warmup
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    val_every: int = 100  # steps; 0: only at the end
    val_batches: int = 8  # global batches per validation
    ckpt_every: int = 0  # steps; 0: only at the end
    compile: bool = False
    fsdp: bool = False
    resume: str | None = None  # path of a checkpoint, or "auto" for out/checkpoint.safetensors
    max_seconds: float | None = None  # training-time budget; the LR schedule then follows time, not steps
    device: str | None = None  # None: cuda when available, else cpu
    token_dtype: str = "uint16"
    progress: bool = True
    precision: str = "bf16"  # CUDA compute: "bf16" autocast, or "fp32" (exact-match checks, e.g. DDP vs one GPU)

    # Fields a resumed run must share with its checkpoint (the rest only change logging or speed).
    TRAJECTORY_FIELDS = ("batch_size", "seq_len", "steps", "lr", "min_lr_ratio", "warmup", "weight_decay",
                         "grad_clip", "seed", "max_seconds")

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("warmup", "val_every", "ckpt_every", "val_batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be 'bf16' or 'fp32', got {self.precision!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if self.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"seq_len={self.seq_len} is longer than the model's max_seq_len={self.model.max_seq_len} "
                f"(rotary positions are set up to max_seq_len)"
            )
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds!r}")

    def trajectory(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), **{k: getattr(self, k) for k in self.TRAJECTORY_FIELDS}}

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["model"] = self.model.to_dict()
        return d


class StopTraining(Exception):
    """Raised by an `on_step` callback to end a run early (tests use it to simulate a kill)."""


def learning_rate(cfg: TrainConfig, step: int, elapsed: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from lr to lr * min_lr_ratio over the run
    (measured in steps, or in training seconds when there is a time budget)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.max_seconds is not None:
        progress = min(1.0, elapsed / cfg.max_seconds)
    else:
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    low = cfg.lr * cfg.min_lr_ratio
    return low + 0.5 * (cfg.lr - low) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # Decay matrices (and structured factors); not norms or biases.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    fused = device.type == "cuda" and not cfg.fsdp
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def autocast(device: torch.device, precision: str = "bf16"):
    use_bf16 = device.type == "cuda" and precision == "bf16"
    return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()


@torch.no_grad()
def evaluate(model, tokens, cfg: TrainConfig, d: Dist) -> float:
    """Mean loss over fixed, evenly spaced validation windows (identical at every evaluation)."""
    was_training = model.training
    model.eval()
    per_rank = cfg.batch_size // d.world_size
    offsets = val_offsets(len(tokens), cfg.seq_len, max(1, cfg.val_batches) * cfg.batch_size)
    total = torch.zeros((), device=d.device)
    batches = offsets.reshape(-1, cfg.batch_size)
    for batch in batches:
        x, y = gather(tokens, batch[d.rank * per_rank : (d.rank + 1) * per_rank], cfg.seq_len)
        with autocast(d.device, cfg.precision):
            _, loss = model(x.to(d.device), y.to(d.device))
        total += loss.float()
    model.train(was_training)
    return float(mean_across_ranks(total / len(batches), d))


def plot_losses(path: Path, history: dict, val: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(history["step"], history["loss"], lw=0.8, alpha=0.7, label="train")
    if val:
        ax.plot([v["step"] for v in val], [v["loss"] for v in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    ckpt.fsync_replace(tmp, path)


def train(cfg: TrainConfig, corpus: Corpus | None = None, dist_info: Dist | None = None,
          on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train one model; returns the log (also written to out/log.json on rank 0)."""
    d = dist_info or setup(cfg.device)
    log = None
    try:
        log = _train(cfg, corpus, d, on_step)
        return log
    finally:
        if dist_info is None:
            teardown(d, clean=log is not None)


def _train(cfg: TrainConfig, corpus: Corpus | None, d: Dist, on_step) -> dict[str, Any]:
    out = Path(cfg.out)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if corpus is None:
        corpus = load_corpus(cfg.data, min_len=cfg.seq_len + 1, token_dtype=cfg.token_dtype)
    if corpus.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the data needs vocab_size >= {corpus.vocab_size}, the model has {cfg.model.vocab_size}")
    data_info = {"fingerprint": corpus.fingerprint(), "description": corpus.description}

    torch.manual_seed(cfg.seed)  # same initial weights on every rank and in every run
    model = GPT(cfg.model).to(d.device)
    n_params = model.num_params()
    trained = wrap(model, d, cfg.fsdp)
    optimizer = make_optimizer(model, cfg, d.device)
    forward = torch.compile(trained) if cfg.compile else trained
    sampler = BatchSampler(corpus.train, cfg.batch_size, cfg.seq_len, cfg.seed, d.rank, d.world_size)

    history: dict[str, list] = {"step": [], "loss": [], "lr": [], "seconds": []}
    val: list[dict] = []
    step, elapsed = 0, 0.0
    ckpt_path = out / CHECKPOINT_NAME
    if cfg.resume:
        path = ckpt_path if cfg.resume == "auto" else Path(cfg.resume)
        meta = ckpt.read_meta(path)
        diffs = ckpt.config_differences(meta["trajectory"], cfg.trajectory())
        if meta["data"]["fingerprint"] != data_info["fingerprint"]:
            diffs.append(f"data: checkpoint {meta['data']['description']!r}, now {data_info['description']!r} (different tokens)")
        if diffs:
            raise ValueError(f"cannot resume from {path}: it was written for a different configuration:\n  " + "\n  ".join(diffs))
        meta = ckpt.load_checkpoint(path, trained, optimizer)
        step, elapsed = meta["step"], meta["elapsed"]
        history, val = meta["history"], meta["val"]
        sampler.load_state_dict(meta["sampler"])

    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = None
    if d.is_main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps if cfg.max_seconds is None else None, initial=step, desc=Path(cfg.out).name,
                   unit="step", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)  # logs: few lines

    def log(final: bool = False) -> dict[str, Any]:
        timed = history["seconds"]
        # Throughput after the first step of this log (which carries compilation and warm-up).
        tps = (tokens_per_step * (len(timed) - 1) / (timed[-1] - timed[0])) if len(timed) > 1 and timed[-1] > timed[0] else None
        doc = {
            "config": cfg.to_dict(), "data": data_info, "params": n_params, "world_size": d.world_size,
            "device": str(d.device), "steps_done": step, "train_seconds": elapsed, "tokens_per_s": tps,
            "final_val_loss": val[-1]["loss"] if val else None, "history": history, "val": val, "finished": final,
        }
        if d.is_main:
            ckpt.write_json_atomic(out / "log.json", doc)
            plot_losses(out / "loss.png", history, val, f"{cfg.model.attention} attention, FFN {cfg.model.ffn_config.describe()}, "
                        f"{n_params / 1e6:.2f}M params")
        return doc

    def save() -> None:
        meta = {"step": step, "elapsed": elapsed, "trajectory": cfg.trajectory(), "data": data_info,
                "sampler": sampler.state_dict(), "history": history, "val": val, "world_size": d.world_size}
        ckpt.save_checkpoint(ckpt_path, trained, optimizer, meta)

    def validate() -> None:
        if val and val[-1]["step"] == step:
            return
        val.append({"step": step, "loss": evaluate(forward, corpus.val, cfg, d), "seconds": elapsed})
        if bar is not None:
            bar.set_postfix_str(f"{bar.postfix}, val {val[-1]['loss']:.4f}")
        log()

    trained.train()
    if cfg.max_seconds is not None and step == 0:
        # Under a time budget, one untimed forward/backward first (torch.compile, Triton autotuning,
        # cuBLAS heuristics), then no update: the clock then measures training, not one-off set-up.
        with autocast(d.device, cfg.precision):
            _, warm = forward(*(t.to(d.device) for t in sampler.batch(0)))
        warm.backward()
        optimizer.zero_grad(set_to_none=True)
    if step == 0 and cfg.val_every:  # the starting point of the validation curve
        validate()
    while step < cfg.steps and (cfg.max_seconds is None or elapsed < cfg.max_seconds):
        t0 = time.perf_counter()
        lr = learning_rate(cfg, step, elapsed)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = next(sampler)  # the batch of this step (the sampler's position is restored on resume)
        with autocast(d.device, cfg.precision):
            _, loss = forward(x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True))
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(mean_across_ranks(loss.detach().float(), d))  # syncs: the step is done
        # Every rank must agree on the clock: it drives the LR under a time budget and when to stop.
        dt = time.perf_counter() - t0
        elapsed += float(mean_across_ranks(torch.tensor(dt, device=d.device), d)) if d.enabled else dt
        step += 1
        history["step"].append(step)
        history["loss"].append(loss_value)
        history["lr"].append(lr)
        history["seconds"].append(elapsed)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"training loss became {loss_value} at step {step}; lower --lr or check the data")
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"loss {loss_value:.4f}, {tokens_per_step / max(dt, 1e-9):,.0f} tok/s", refresh=False)
        if cfg.val_every and step % cfg.val_every == 0:
            validate()
        if cfg.ckpt_every and step % cfg.ckpt_every == 0:
            save()
        if on_step is not None:
            on_step(step, loss_value)
    if bar is not None:
        bar.close()
    validate()
    save()
    return log(final=True)
