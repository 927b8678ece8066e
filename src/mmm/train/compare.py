"""`mmm train --compare dense,mmm --minutes M`: the same width and depth trained for the same wall-clock
budget, once dense (dense layers, exact attention) and once as configured (structured layers and/or
another attention), on the same data in the same order. Writes compare.png (validation loss against
training seconds, one curve per model) and compare.json (tokens/s, final validation loss, parameters,
config of each) in `out/`, and each run's own log, plot and checkpoint in `out/<name>/`.

The clock counts training steps only (forward, backward, optimizer), not validation, checkpoint writing
or one untimed warm-up forward/backward before the first step (torch.compile, Triton autotuning, cuBLAS
heuristics: one-off set-up a longer run would amortise). Validation happens at the same step counts for
both, on the same fixed validation windows.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path
from typing import Any

import torch

from ..configs import DenseConfig
from .checkpoint import fsync_replace, write_json_atomic
from .data import Corpus
from .distributed import Dist
from .loop import TrainConfig, train

COMPARE_NAMES = ("dense", "mmm")


def variant(base: TrainConfig, name: str, minutes: float) -> TrainConfig:
    """The TrainConfig of one contestant: `dense` strips structures and uses exact attention."""
    if name not in COMPARE_NAMES:
        raise ValueError(f"--compare: unknown model {name!r}; choose from {', '.join(COMPARE_NAMES)} (e.g. --compare dense,mmm)")
    model = base.model
    if name == "dense":
        model = dataclasses.replace(model, ffn_config=DenseConfig(), attn_proj_config=DenseConfig(), attention="exact")
    return dataclasses.replace(base, model=model, out=str(Path(base.out) / name), max_seconds=60.0 * minutes, resume=None)


def parse_names(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"--compare expects distinct comma-separated names from {COMPARE_NAMES}, got {spec!r}")
    for n in names:
        if n not in COMPARE_NAMES:
            raise ValueError(f"--compare: unknown model {n!r}; choose from {', '.join(COMPARE_NAMES)}")
    return names


def plot_compare(path: Path, runs: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, log in runs.items():
        m = log["config"]["model"]
        label = (f"{name}: FFN {m['ffn_config']['structure']}, attn-proj {m['attn_proj_config']['structure']}, "
                 f"{m['attention']} attention ({log['params'] / 1e6:.3g}M params"
                 + (f", {log['tokens_per_s']:,.0f} tok/s)" if log["tokens_per_s"] else ")"))
        ax.plot([v["seconds"] for v in log["val"]], [v["loss"] for v in log["val"]], "o-", ms=3, label=label)
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel("validation loss (nats/token)")
    m = next(iter(runs.values()))["config"]
    ax.set_title(f"d_model={m['model']['d_model']}, layers={m['model']['n_layers']}, seq={m['seq_len']}, "
                 f"batch={m['batch_size']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    fsync_replace(tmp, path)


def compare(base: TrainConfig, names: list[str], minutes: float, corpus: Corpus | None = None,
            dist_info: Dist | None = None) -> dict[str, Any]:
    if not minutes > 0:
        raise ValueError(f"--minutes must be positive, got {minutes!r}")
    runs = {}
    for name in names:
        runs[name] = train(variant(base, name, minutes), corpus=corpus, dist_info=dist_info)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next model starts with the whole GPU
    summary = {
        "minutes": minutes,
        "clock": "training seconds (validation and checkpointing excluded)",
        "device": next(iter(runs.values()))["device"],
        "world_size": next(iter(runs.values()))["world_size"],
        "models": {
            name: {
                "params": log["params"], "tokens_per_s": log["tokens_per_s"], "steps": log["steps_done"],
                "train_seconds": log["train_seconds"], "final_val_loss": log["final_val_loss"],
                "val_curve": [[v["seconds"], v["loss"]] for v in log["val"]], "config": log["config"],
            }
            for name, log in runs.items()
        },
    }
    finals = {n: m["final_val_loss"] for n, m in summary["models"].items()}
    summary["lowest_final_val_loss"] = min(finals, key=finals.get)
    if dist_info is None or dist_info.is_main:
        out = Path(base.out)
        write_json_atomic(out / "compare.json", summary)
        plot_compare(out / "compare.png", runs)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{summary['minutes']:g} min each on {summary['device']} (x{summary['world_size']}):"]
    for name, m in summary["models"].items():
        tps = f"{m['tokens_per_s']:,.0f} tok/s" if m["tokens_per_s"] else "n/a tok/s"
        lines.append(f"  {name:>6}: final val loss {m['final_val_loss']:.4f}, {tps}, {m['steps']} steps, {m['params'] / 1e6:.2f}M params")
    lines.append(f"  lowest final validation loss: {summary['lowest_final_val_loss']}")
    return "\n".join(lines)


__all__ = ["compare", "variant", "parse_names", "format_summary", "COMPARE_NAMES"]
