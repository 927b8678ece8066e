"""Save a converted model as safetensors + JSON, and rebuild it on a fresh copy of its base model.

A checkpoint is a directory with `model.safetensors` (the whole state_dict; tied tensors stored
once) and `mmm_config.json` (which layers are structured, and how). Nothing is pickled.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from ..configs import config_from_dict
from ..linear import StructuredLinear
from .surgery import _places, is_linear, linear_shape

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "mmm_config.json"
FORMAT_VERSION = 1


def save_pretrained(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write `model` to the directory `path`, atomically: the files are written and fsynced in a
    temporary directory beside it, which then takes its place. If anything fails, an earlier
    checkpoint at `path` is left as it was. Other files already in `path` (a tokenizer, say) are kept."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"path {path} exists and is not a directory; a checkpoint is a directory")
    layers = {
        name: {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
            "config": m.config.to_dict(),
        }
        for name, m in model.named_modules()
        if isinstance(m, StructuredLinear)
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"}, force_contiguous=True)
        with open(tmp / CONFIG_NAME, "w") as f:
            json.dump({"format_version": FORMAT_VERSION, "layers": layers}, f, indent=2)
            f.write("\n")
        if path.exists():
            _link_other_files(path, tmp)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            _fsync(tmp / name)
        _fsync(tmp)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_pretrained(path: str | os.PathLike, base_model: nn.Module) -> nn.Module:
    """Rebuild a checkpoint written by `save_pretrained` on `base_model` (the same architecture,
    unconverted or converted), in place, and return it.

    Every mismatch is an error and leaves `base_model` as it was: a saved layer the model lacks or
    whose shape differs, tensors the checkpoint lacks (missing) or the model lacks (unexpected).
    """
    if not isinstance(base_model, nn.Module):
        raise TypeError(f"base_model must be a torch.nn.Module, got {type(base_model).__name__}")
    path = Path(path)
    weights, config_file = path / WEIGHTS_NAME, path / CONFIG_NAME
    for f in (config_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{path} is not an mmm checkpoint: {f.name} is missing")
    meta = json.loads(config_file.read_text())
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(f"{config_file}: format_version {found!r} is not supported (this mmm reads {FORMAT_VERSION})")

    # Check every saved layer against the model before changing anything.
    saved_layers = meta.get("layers", {})
    modules = dict(base_model.named_modules())
    problems, plan = [], []
    for name, entry in saved_layers.items():
        try:
            config = config_from_dict(entry["config"])
            saved_shape = (int(entry["in_features"]), int(entry["out_features"]))
            saved_bias = bool(entry["bias"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{config_file}: the entry of layer {name!r} is malformed ({e})") from None
        module = modules.get(name)
        if module is None:
            close = difflib.get_close_matches(name, list(modules), n=1)
            problems.append(f"{name}: the model has no such module" + (f" (closest: {close[0]})" if close else ""))
            continue
        if not (is_linear(module) or isinstance(module, StructuredLinear)):
            problems.append(f"{name}: is a {type(module).__name__} in the model; expected nn.Linear, Conv1D or StructuredLinear")
            continue
        shape = linear_shape(module)
        if shape != saved_shape:
            problems.append(
                f"{name}: the model's layer is {shape[1]}x{shape[0]} (out x in), the checkpoint's is {saved_shape[1]}x{saved_shape[0]}"
            )
        if (module.bias is not None) != saved_bias:
            problems.append(f"{name}: bias={module.bias is not None} in the model, bias={saved_bias} in the checkpoint")
        plan.append((name, module, config, saved_bias))
    for name, m in modules.items():
        if isinstance(m, StructuredLinear) and name not in saved_layers:
            problems.append(f"{name}: structured in the model but not in the checkpoint (load into an unconverted base model)")
    if problems:
        raise ValueError(f"checkpoint {path} does not fit this model:\n  " + "\n  ".join(_listing(problems)))

    places = _places(base_model)
    swapped = []  # (parent, attribute, old module), to undo on failure
    try:
        for name, module, config, bias in plan:
            like = next(module.parameters())
            new = _empty_layer(*linear_shape(module), config, bias, like.device, like.dtype)
            new.train(module.training)
            for parent, attr in places[id(module)]:
                setattr(parent, attr, new)
                swapped.append((parent, attr, module))
        _check_tensors(base_model, weights)
        load_model(base_model, weights, strict=True)
    except BaseException:
        for parent, attr, module in reversed(swapped):
            setattr(parent, attr, module)
        raise
    return base_model


def _empty_layer(in_features, out_features, config, bias, device, dtype) -> StructuredLinear:
    """A StructuredLinear whose parameters will be overwritten by the checkpoint: built on the meta
    device (no initialisation cost) and given uninitialised memory. Built for real instead when it
    has buffers the checkpoint does not hold (those must be computed), or meta construction fails."""
    try:
        layer = StructuredLinear(in_features, out_features, config, bias=bias, device="meta", dtype=dtype)
    except (NotImplementedError, RuntimeError):
        return StructuredLinear(in_features, out_features, config, bias=bias, device=device, dtype=dtype)
    saved = set(layer.state_dict())
    if any(name not in saved for name, _ in layer.named_buffers()):
        return StructuredLinear(in_features, out_features, config, bias=bias, device=device, dtype=dtype)
    return layer.to_empty(device=device)


def _check_tensors(model: nn.Module, weights: Path) -> None:
    """The checkpoint holds exactly the model's tensors, with the same shapes (else nothing is loaded)."""
    with safe_open(str(weights), framework="pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    expected = model.state_dict()
    # Tied tensors are saved under one of their names: a name is missing only if no alias was saved.
    aliases = defaultdict(list)
    for k, t in expected.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride()) if t.numel() else k
        aliases[key].append(k)
    missing = sorted(k for group in aliases.values() if not any(g in saved for g in group) for k in group)
    unexpected = sorted(set(saved) - set(expected))
    mismatched = [
        f"{k}: {list(saved[k])} in the checkpoint, {list(expected[k].shape)} in the model"
        for k in sorted(saved)
        if k in expected and tuple(expected[k].shape) != saved[k]
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) of the model missing from the checkpoint: " + ", ".join(_listing(missing)))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s) in the checkpoint: " + ", ".join(_listing(unexpected)))
        if mismatched:
            parts.append("shape mismatches: " + "; ".join(_listing(mismatched)))
        raise ValueError(f"checkpoint {weights.parent} was saved from a different architecture:\n  " + "\n  ".join(parts))


def _listing(items: list[str], limit: int = 12) -> list[str]:
    return items if len(items) <= limit else items[:limit] + [f"... and {len(items) - limit} more"]


def _link_other_files(old: Path, new: Path) -> None:
    """Bring the files of the checkpoint being replaced that are not ours into the new one
    (hard links where possible, so nothing large is copied)."""
    for entry in old.iterdir():
        if entry.name in (WEIGHTS_NAME, CONFIG_NAME):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`. An existing `path` is first renamed aside and put back if the second
    rename fails, then deleted; a crash between the two renames leaves it whole beside `path`."""
    if not path.exists():
        os.rename(tmp, path)
    else:
        old = tmp.with_name(tmp.name.replace(".tmp-", ".old-", 1))
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync(path.parent)


def _fsync(p: Path) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms (Windows); files always can
        if p.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not p.is_dir():
            raise
    finally:
        os.close(fd)
