"""Training checkpoints: one safetensors file, written atomically, never pickled.

Tensors: the model's full state dict under "model.<name>", the optimizer's per-parameter state under
"optim.<param name>.<key>", the RNG states under "rng.<device>". Everything else (step, configs, the data
sampler position, optimizer hyper-parameters, the loss history) is one JSON document stored in the
safetensors header metadata, so model, optimizer and bookkeeping can never come from different writes.

Writing: temp file in the same directory -> fsync -> os.replace -> fsync of the directory. A process
killed at any moment leaves either the previous checkpoint or the new one, never a torn file.
Model and optimizer states go through `torch.distributed.checkpoint.state_dict`, which gathers full
tensors from DDP and FSDP2 models alike (and is a plain state dict on one process).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

FORMAT = "mmm-train-checkpoint/1"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def fsync_replace(tmp: Path, final: Path) -> None:
    """Make tmp durable, then atomically put it at `final`."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    try:
        fd = os.open(final.parent, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    fsync_replace(tmp, path)


def gather_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Full (unsharded, CPU) tensors of model and optimizer, and the optimizer's param groups. Collective
    under FSDP: every rank must call it; only rank 0 gets the tensors (the others get empty dicts)."""
    tensors = {f"model.{k}": v for k, v in get_model_state_dict(model, options=_FULL).items()}
    osd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    for name, state in osd.get("state", {}).items():
        for key, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"optim.{name}.{key}"] = t
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd.get("param_groups", [])]
    return tensors, groups


def save_checkpoint(path: Path, model, optimizer, meta: dict[str, Any]) -> None:
    """Collective (all ranks call it); rank 0 writes `path`."""
    tensors, groups = gather_state(model, optimizer)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank != 0:
        return
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    doc = {"format": FORMAT, "optimizer_param_groups": groups, **meta}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"mmm": json.dumps(doc)})
    fsync_replace(tmp, path)


def read_meta(path: Path) -> dict[str, Any]:
    """The JSON part of a checkpoint (cheap: reads only the header)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise ValueError(f"{path} is not a readable safetensors checkpoint: {exc}") from None
    if "mmm" not in meta:
        raise ValueError(f"{path} is a safetensors file but not an mmm training checkpoint (no 'mmm' metadata)")
    doc = json.loads(meta["mmm"])
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {doc.get('format')!r}, this version reads {FORMAT!r}")
    return doc


def load_checkpoint(path: Path, model, optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG states from `path` (every rank reads it); returns the JSON part."""
    doc = read_meta(path)
    model_sd, optim_state = {}, {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            kind, _, rest = key.partition(".")
            if kind == "model":
                model_sd[rest] = f.get_tensor(key)
            elif kind == "optim":
                name, _, field = rest.rpartition(".")
                optim_state.setdefault(name, {})[field] = f.get_tensor(key)
            elif key == "rng.cpu":
                torch.set_rng_state(f.get_tensor(key))
            elif key == "rng.cuda" and torch.cuda.is_available():
                torch.cuda.set_rng_state(f.get_tensor(key))
    set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True, strict=True))
    osd = {"state": optim_state, "param_groups": doc["optimizer_param_groups"]}
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))
    return doc


def config_differences(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """'field: checkpoint X, now Y' for every differing (nested) field."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key, "<absent>"), now.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return out
