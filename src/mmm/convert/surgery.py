"""Model surgery: swap the linear layers of any `nn.Module` for `StructuredLinear` ones, in place.

Which layers: `target_modules` / `exclude_modules` / `filter_fn`, in the forms PEFT users know.
Which structure: one config, a {pattern: config} dict, or a function (name, module) -> config.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from tqdm import tqdm

from ..configs import StructureConfig
from ..linear import StructuredLinear

# Names Hugging Face gives output heads; with "all-linear" a layer under any of them stays dense,
# because the head decides the logits directly and is often tied to the input embedding.
HEAD_NAMES = frozenset({"lm_head", "cls", "classifier", "score"})
_PROGRESS_MIN_LAYERS = 8

ModuleSpec = Union[None, str, Sequence[str]]
ConfigSpec = Union[
    StructureConfig,
    Mapping[str, Optional[StructureConfig]],
    Callable[[str, nn.Module], Optional[StructureConfig]],
]


def is_linear(module: nn.Module) -> bool:
    """An `nn.Linear` or a transformers GPT-2 style `Conv1D` (recognised by name and shape, so that
    transformers need not be imported)."""
    if isinstance(module, nn.Linear):
        # nn.MultiheadAttention reads out_proj.weight directly, so its out_proj cannot be swapped.
        return type(module).__name__ != "NonDynamicallyQuantizableLinear"
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, torch.Tensor) and weight.dim() == 2


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an `nn.Linear`, a `Conv1D` (weight stored [in, out]) or a `StructuredLinear`."""
    if isinstance(module, (nn.Linear, StructuredLinear)):
        return module.in_features, module.out_features
    in_features, out_features = module.weight.shape
    return in_features, out_features


@dataclass
class LayerReport:
    name: str
    out_features: int
    in_features: int
    structure: str
    params_before: int
    params_after: int
    error: float  # ||W - W_hat||_F / ||W||_F


@dataclass
class ConversionReport:
    """What `convert_` did: one `LayerReport` per converted layer, and the layers it skipped (with why)."""

    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def max_error(self) -> float:
        return max((r.error for r in self.layers), default=0.0)

    @property
    def rows(self) -> list[dict]:
        return [asdict(r) for r in self.layers]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerReport:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(f"{name!r} was not converted; converted layers: {[r.name for r in self.layers]}")

    def to_dict(self) -> dict:
        """Plain data for JSON."""
        return {
            "layers": self.rows,
            "skipped": [{"name": n, "reason": why} for n, why in self.skipped],
            "totals": {
                "layers": len(self.layers),
                "params_before": self.params_before,
                "params_after": self.params_after,
                "max_error": self.max_error,
            },
        }

    def __str__(self) -> str:
        header = ("layer", "shape (out x in)", "structure", "params before", "params after", "error")
        rows = [
            (r.name, f"{r.out_features}x{r.in_features}", r.structure, f"{r.params_before:,}", f"{r.params_after:,}", f"{r.error:.4g}")
            for r in self.layers
        ]
        share = f" ({self.params_after / self.params_before:.1%})" if self.params_before else ""
        total = (f"total ({len(self.layers)} layer{'' if len(self.layers) == 1 else 's'})", "", "", f"{self.params_before:,}", f"{self.params_after:,}{share}", f"max {self.max_error:.4g}")
        widths = [max(len(row[i]) for row in [header, *rows, total]) for i in range(len(header))]

        def line(row):  # text columns left-aligned, numbers right-aligned
            return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

        rule = "-" * len(line(tuple("-" * w for w in widths)))
        out = [line(header), rule, *map(line, rows), rule, line(total)]
        out += [f"skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(out)


def convert_(
    model: nn.Module,
    cfg: ConfigSpec,
    target_modules: ModuleSpec = None,
    exclude_modules: ModuleSpec = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    skip_incompatible: bool = False,
) -> ConversionReport:
    """Replace the chosen linear layers of `model` by their projection onto a structure, in place.

    target_modules: None or "all-linear" (every nn.Linear / Conv1D except output heads: layers
        tied to an input embedding, the model's `get_output_embeddings()`, or under a module named
        lm_head, cls, classifier or score); a list of names (a name matches a layer's full
        qualified name or a suffix of it at a '.'); or a regex string (full match of the name).
    exclude_modules: the same forms (except "all-linear"), removed from the targets.
    filter_fn(module, name) -> bool: keeps only the layers for which it is true.
    cfg: a StructureConfig for every layer; a dict {name, suffix or regex: config or None}, the
        first matching key deciding (layers no key matches stay dense); or a function
        (name, module) -> config or None (None: leave dense).
    skip_incompatible: skip, and list in the report, layers whose shape the structure cannot take
        (instead of raising).

    Layers keep their device and dtype. Either every chosen layer is converted or, on an error,
    none is.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    choose = _config_chooser(cfg)
    linears = [(n, m) for n, m in model.named_modules() if n and is_linear(m)]
    names = [n for n, _ in linears]

    if target_modules is None or target_modules == "all-linear":
        heads = _output_heads(model)
        targets = [(n, m) for n, m in linears if id(m) not in heads and not HEAD_NAMES.intersection(n.split("."))]
    else:
        rules = _rules(target_modules, "target_modules", names)
        targets = [(n, m) for n, m in linears if any(match(n) for _, match in rules)]
    if exclude_modules is not None:
        rules = _rules(exclude_modules, "exclude_modules", names)
        targets = [(n, m) for n, m in targets if not any(match(n) for _, match in rules)]
    if filter_fn is not None:
        targets = [(n, m) for n, m in targets if filter_fn(m, n)]
    if isinstance(cfg, Mapping):
        _check_config_keys(cfg, [n for n, _ in targets], names)

    # Decide and check everything before touching the model.
    report = ConversionReport()
    plan = []
    for name, module in targets:
        config = choose(name, module)
        if config is None:
            continue
        if not isinstance(config, StructureConfig):
            raise TypeError(f"cfg gave {type(config).__name__} for layer {name}; expected a StructureConfig or None")
        try:
            config.check_shape(*linear_shape(module))
        except ValueError as e:
            if not skip_incompatible:
                raise ValueError(f"{name}: {e}") from None
            report.skipped.append((name, str(e)))
            continue
        plan.append((name, module, config))

    places = _places(model)
    holders = _weight_holders(model)
    swapped = []  # (parent, attribute, old module), to undo a half-done conversion
    try:
        for name, module, config in tqdm(plan, desc="mmm.convert_", unit="layer", disable=len(plan) < _PROGRESS_MIN_LAYERS or None):
            others = sorted({n for owner, n in holders[id(module.weight)] if owner != id(module)})
            if others:
                warnings.warn(f"{name}.weight is shared with {others}; the structured layer gets its own parameters, so the tie is broken", stacklevel=2)
            try:
                new = StructuredLinear.from_linear(module, config)
            except (ValueError, TypeError) as e:
                raise type(e)(f"{name}: {e}") from e
            new.train(module.training)
            if not module.weight.requires_grad:
                new.requires_grad_(False)
            for parent, attr in places[id(module)]:
                setattr(parent, attr, new)
                swapped.append((parent, attr, module))
            in_features, out_features = linear_shape(module)
            report.layers.append(
                LayerReport(
                    name=name,
                    out_features=out_features,
                    in_features=in_features,
                    structure=config.describe(),
                    params_before=sum(p.numel() for p in module.parameters()),
                    params_after=new.num_params,
                    error=float(new.projection_error),
                )
            )
    except BaseException:
        for parent, attr, module in reversed(swapped):
            setattr(parent, attr, module)
        raise
    return report


# --- helpers -----------------------------------------------------------------------------------


def _config_chooser(cfg: ConfigSpec) -> Callable[[str, nn.Module], Optional[StructureConfig]]:
    if isinstance(cfg, StructureConfig):
        return lambda name, module: cfg
    if isinstance(cfg, Mapping):
        keyed = [(_name_or_regex(key, "cfg"), config) for key, config in cfg.items()]

        def choose(name, module):
            return next((config for match, config in keyed if match(name)), None)

        return choose
    if callable(cfg):
        return cfg
    raise TypeError(
        f"cfg must be a StructureConfig, a dict {{pattern: config}} or a function (name, module) -> config, got {type(cfg).__name__}"
    )


def _name_or_regex(key: str, arg: str) -> Callable[[str], bool]:
    """A dict key matches a name, a suffix at a '.', or (if it is a valid regex) by full regex match."""
    if not isinstance(key, str) or not key:
        raise TypeError(f"{arg} keys must be non-empty strings, got {key!r}")
    try:
        rx = re.compile(key)
    except re.error:
        rx = None
    return lambda n: n == key or n.endswith("." + key) or (rx is not None and rx.fullmatch(n) is not None)


def _rules(spec: ModuleSpec, arg: str, names: list[str]) -> list[tuple[str, Callable[[str], bool]]]:
    """(key, predicate) pairs for target_modules / exclude_modules; every key must match some layer."""
    if isinstance(spec, str):
        try:
            rx = re.compile(spec)
        except re.error as e:
            raise ValueError(f"{arg}={spec!r} is not a valid regular expression ({e}); pass a list for plain names") from None
        rules = [(spec, lambda n: rx.fullmatch(n) is not None)]
    elif isinstance(spec, (list, tuple, set, frozenset)):
        for key in spec:
            if not isinstance(key, str) or not key:
                raise TypeError(f"{arg} must hold non-empty strings, got {key!r}")
        rules = [(key, lambda n, key=key: n == key or n.endswith("." + key)) for key in spec]
    else:
        raise TypeError(f"{arg} must be None, 'all-linear', a regex string or a list of layer names, got {type(spec).__name__}")
    for key, match in rules:
        if not any(match(n) for n in names):
            raise ValueError(_no_match(arg, key, names))
    return rules


def _no_match(arg: str, key: str, names: list[str]) -> str:
    if not names:
        return f"{arg}: {key!r} matches nothing: the model has no nn.Linear or Conv1D layer"
    # Compare against every '.'-suffix, so that a short misspelt name finds the short right one.
    suffixes = sorted({".".join(parts[i:]) for parts in (n.split(".") for n in names) for i in range(len(parts))})
    close = difflib.get_close_matches(key, suffixes, n=5, cutoff=0.4)
    hint = f"closest linear layer names: {close}" if close else f"linear layers include: {names[:5]}"
    return f"{arg}: {key!r} matches no linear layer of the model; {hint}"


def _check_config_keys(cfg: Mapping, targeted: list[str], names: list[str]) -> None:
    for key in cfg:
        match = _name_or_regex(key, "cfg")
        if any(match(n) for n in targeted):
            continue
        elsewhere = [n for n in names if match(n)]
        if elsewhere:
            raise ValueError(
                f"cfg key {key!r} matches only layers that target_modules/exclude_modules/filter_fn leave out "
                f"(output heads are left out by default; name them in target_modules to convert them): {elsewhere[:5]}"
            )
        raise ValueError(_no_match("cfg", key, names))


def _output_heads(model: nn.Module) -> set[int]:
    """ids of the linear layers that make the model's output: tied to an input embedding, or the
    model's `get_output_embeddings()` (Hugging Face models)."""
    embedding_weights = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    ids = {id(w) for w in embedding_weights}
    pointers = {w.data_ptr() for w in embedding_weights if w.device.type != "meta"}
    heads = set()
    for m in model.modules():
        if is_linear(m) and (id(m.weight) in ids or (m.weight.device.type != "meta" and m.weight.data_ptr() in pointers)):
            heads.add(id(m))
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            out = get()
        except (NotImplementedError, AttributeError):
            out = None
        if isinstance(out, nn.Module):
            heads.add(id(out))
    return heads


def _places(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(module) -> every (parent, attribute) holding it, so a module reused in two places is swapped in both."""
    places = defaultdict(list)
    seen = set()
    for _, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is not None and (id(parent), attr) not in seen:
                seen.add((id(parent), attr))
                places[id(child)].append((parent, attr))
    return places


def _weight_holders(model: nn.Module) -> dict[int, list[tuple[int, str]]]:
    """id(parameter) -> (id(module), qualified name) for every module holding it, to spot tied weights."""
    holders = defaultdict(list)
    for mname, m in model.named_modules(remove_duplicate=False):
        for pname, p in m._parameters.items():
            if p is not None:
                holders[id(p)].append((id(m), f"{mname}.{pname}" if mname else pname))
    return holders
