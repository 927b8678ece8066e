"""Structure configs: small frozen dataclasses that say *which* structure a layer has.

A config knows nothing about a layer's size until `check_shape(in_features, out_features)` is
called; that is where a size the structure cannot take is turned into a clear error that lists the
sizes it can take. Configs round-trip through plain dicts (`to_dict` / `config_from_dict`) so that
a saved model's JSON description names every layer's structure.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "StructureConfig",
    "DenseConfig",
    "LowRankConfig",
    "BlockDiagConfig",
    "MonarchConfig",
    "KroneckerConfig",
    "CirculantConfig",
    "ToeplitzConfig",
    "LDRConfig",
    "config_from_dict",
    "divisors",
]

_REGISTRY: dict[str, type["StructureConfig"]] = {}


def divisors(n: int) -> list[int]:
    """All positive divisors of n, ascending."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _positive_int(cls_name: str, field: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{cls_name}.{field} must be a positive int, got {value!r}")


def _check_nblocks(cfg_name: str, nblocks: int, in_features: int, out_features: int) -> None:
    for dim_name, dim in (("in_features", in_features), ("out_features", out_features)):
        if dim % nblocks != 0:
            options = ", ".join(str(d) for d in divisors(math.gcd(in_features, out_features)) if d <= 4096)
            raise ValueError(
                f"{cfg_name}(nblocks={nblocks}) cannot take a {out_features}x{in_features} layer: nblocks "
                f"must divide {dim_name}={dim} (and the other dimension); values that work: {options}"
            )


@dataclass(frozen=True)
class StructureConfig:
    """Base of all structure configs. `name` is the key used in saved JSON and by `mmm bench`."""

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            _REGISTRY[cls.name] = cls

    def check_shape(self, in_features: int, out_features: int) -> None:
        """Raise ValueError if a layer of this shape cannot take this structure."""
        _positive_int(type(self).__name__, "in_features", in_features)
        _positive_int(type(self).__name__, "out_features", out_features)

    def to_dict(self) -> dict[str, Any]:
        return {"structure": self.name, **dataclasses.asdict(self)}

    def describe(self) -> str:
        """Short human-readable label, e.g. 'monarch(nblocks=4)'."""
        args = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items() if v is not None)
        return f"{self.name}({args})"


def config_from_dict(d: dict[str, Any]) -> StructureConfig:
    """Inverse of `StructureConfig.to_dict`."""
    d = dict(d)
    key = d.pop("structure", None)
    if key not in _REGISTRY:
        raise ValueError(f"unknown structure {key!r}; known: {sorted(_REGISTRY)}")
    cls = _REGISTRY[key]
    for k, v in d.items():  # JSON turns tuples into lists
        if isinstance(v, list):
            d[k] = tuple(v)
    return cls(**d)


@dataclass(frozen=True)
class DenseConfig(StructureConfig):
    """A plain dense weight (the baseline; projection is the identity)."""

    name: ClassVar[str] = "dense"


@dataclass(frozen=True)
class LowRankConfig(StructureConfig):
    """W = U @ V with U: [out, rank], V: [rank, in]."""

    name: ClassVar[str] = "lowrank"
    rank: int = 64

    def __post_init__(self) -> None:
        _positive_int("LowRankConfig", "rank", self.rank)

    def check_shape(self, in_features: int, out_features: int) -> None:
        super().check_shape(in_features, out_features)
        limit = min(in_features, out_features)
        if self.rank > limit:
            raise ValueError(
                f"LowRankConfig(rank={self.rank}) cannot take a {out_features}x{in_features} layer: "
                f"rank must be at most min(in_features, out_features) = {limit}"
            )


@dataclass(frozen=True)
class BlockDiagConfig(StructureConfig):
    """W = blockdiag(W_1, ..., W_b), each block [out/b, in/b]."""

    name: ClassVar[str] = "blockdiag"
    nblocks: int = 4

    def __post_init__(self) -> None:
        _positive_int("BlockDiagConfig", "nblocks", self.nblocks)

    def check_shape(self, in_features: int, out_features: int) -> None:
        super().check_shape(in_features, out_features)
        _check_nblocks("BlockDiagConfig", self.nblocks, in_features, out_features)


@dataclass(frozen=True)
class MonarchConfig(StructureConfig):
    """Monarch: block-diagonal L (b blocks), a fixed shuffle, block-diagonal R (b blocks).

    The coupling between input block k and output block l is a rank-`block_rank` matrix, so the
    middle width is b * b * block_rank. By default block_rank = max(1, min(in, out) // b**2), which
    gives square blocks for square layers and 2/b of the dense arithmetic.
    """

    name: ClassVar[str] = "monarch"
    nblocks: int = 4
    block_rank: int | None = None

    def __post_init__(self) -> None:
        _positive_int("MonarchConfig", "nblocks", self.nblocks)
        _positive_int("MonarchConfig", "block_rank", self.block_rank, allow_none=True)

    def check_shape(self, in_features: int, out_features: int) -> None:
        super().check_shape(in_features, out_features)
        _check_nblocks("MonarchConfig", self.nblocks, in_features, out_features)

    def resolved_block_rank(self, in_features: int, out_features: int) -> int:
        if self.block_rank is not None:
            return self.block_rank
        return max(1, min(in_features, out_features) // (self.nblocks * self.nblocks))


@dataclass(frozen=True)
class KroneckerConfig(StructureConfig):
    """W = sum_{i<terms} A_i (x) B_i with A_i: [out_factors[0], in_factors[0]], B_i: [out_factors[1], in_factors[1]].

    Leave the factors as None to pick, for each of in and out, the divisor pair closest to a square.
    """

    name: ClassVar[str] = "kronecker"
    terms: int = 1
    in_factors: tuple[int, int] | None = None
    out_factors: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        _positive_int("KroneckerConfig", "terms", self.terms)
        for field in ("in_factors", "out_factors"):
            value = getattr(self, field)
            if value is None:
                continue
            if isinstance(value, list):
                object.__setattr__(self, field, tuple(value))
                value = tuple(value)
            if len(value) != 2:
                raise ValueError(f"KroneckerConfig.{field} must be a pair (a, b), got {value!r}")
            for v in value:
                _positive_int("KroneckerConfig", field, v)

    @staticmethod
    def _near_square(n: int) -> tuple[int, int]:
        a = max(d for d in divisors(n) if d * d <= n)
        return (a, n // a)

    def resolved_factors(self, in_features: int, out_features: int) -> tuple[tuple[int, int], tuple[int, int]]:
        in_f = self.in_factors or self._near_square(in_features)
        out_f = self.out_factors or self._near_square(out_features)
        return tuple(in_f), tuple(out_f)  # type: ignore[return-value]

    def check_shape(self, in_features: int, out_features: int) -> None:
        super().check_shape(in_features, out_features)
        for field, dim_name, dim in (("in_factors", "in_features", in_features), ("out_factors", "out_features", out_features)):
            f = getattr(self, field)
            if f is not None and f[0] * f[1] != dim:
                pairs = ", ".join(f"({d}, {dim // d})" for d in divisors(dim) if d <= 4096)
                raise ValueError(
                    f"KroneckerConfig({field}={f}) cannot take {dim_name}={dim}: the two factors must "
                    f"multiply to {dim}; pairs that work: {pairs}"
                )
        (i1, i2), (o1, o2) = self.resolved_factors(in_features, out_features)
        limit = min(o1 * i1, o2 * i2)
        if self.terms > limit:
            raise ValueError(
                f"KroneckerConfig(terms={self.terms}) is more than the {limit} independent terms a "
                f"{out_features}x{in_features} layer with factors A:[{o1},{i1}], B:[{o2},{i2}] can hold"
            )


@dataclass(frozen=True)
class CirculantConfig(StructureConfig):
    """Circulant (square) or block-circulant (rectangular): a grid of block_size x block_size circulant
    blocks. block_size defaults to gcd(in, out), which is one circulant for square layers."""

    name: ClassVar[str] = "circulant"
    block_size: int | None = None

    def __post_init__(self) -> None:
        _positive_int("CirculantConfig", "block_size", self.block_size, allow_none=True)

    def resolved_block_size(self, in_features: int, out_features: int) -> int:
        return self.block_size or math.gcd(in_features, out_features)

    def check_shape(self, in_features: int, out_features: int) -> None:
        super().check_shape(in_features, out_features)
        if self.block_size is not None:
            g = math.gcd(in_features, out_features)
            if g % self.block_size != 0:
                options = ", ".join(str(d) for d in divisors(g) if d <= 65536)
                raise ValueError(
                    f"CirculantConfig(block_size={self.block_size}) cannot take a {out_features}x{in_features} "
                    f"layer: block_size must divide both; values that work: {options}"
                )


@dataclass(frozen=True)
class ToeplitzConfig(StructureConfig):
    """Toeplitz: W[i, j] depends only on i - j (in + out - 1 parameters), any rectangular shape."""

    name: ClassVar[str] = "toeplitz"


@dataclass(frozen=True)
class LDRConfig(StructureConfig):
    """Low displacement rank, Toeplitz-like: Z_1 W - W Z_{-1} has rank <= `rank` (per block).

    Square blocks of block_size (default gcd(in, out)) tile rectangular layers, as for circulant.
    """

    name: ClassVar[str] = "ldr"
    rank: int = 4
    block_size: int | None = None

    def __post_init__(self) -> None:
        _positive_int("LDRConfig", "rank", self.rank)
        _positive_int("LDRConfig", "block_size", self.block_size, allow_none=True)

    def resolved_block_size(self, in_features: int, out_features: int) -> int:
        return self.block_size or math.gcd(in_features, out_features)

    def check_shape(self, in_features: int, out_features: int) -> None:
        super().check_shape(in_features, out_features)
        g = math.gcd(in_features, out_features)
        if self.block_size is not None and g % self.block_size != 0:
            options = ", ".join(str(d) for d in divisors(g) if d <= 65536)
            raise ValueError(
                f"LDRConfig(block_size={self.block_size}) cannot take a {out_features}x{in_features} "
                f"layer: block_size must divide both; values that work: {options}"
            )
        n = self.resolved_block_size(in_features, out_features)
        if self.rank > n:
            raise ValueError(f"LDRConfig(rank={self.rank}) must be at most the block size {n}")
