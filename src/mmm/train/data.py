"""Training data: a token stream for train and one for validation, and a sampler that maps a step to a batch.

Sources:
- default: the `*.py` source of the running interpreter's standard library (every machine with Python
  has it), byte-level tokens (vocab 256);
- `--data PATH ...`: text files or directories of them (byte-level, vocab 256), or token files:
  `.npy` (any 1-D unsigned/signed integer array) or `.bin` (raw uint16 by default, `token_dtype="int32"`
  for larger vocabularies; nanoGPT's format).

Text that is not valid UTF-8 is decoded with errors="replace" (U+FFFD for each bad byte sequence) and a
warning names the file: a stray Latin-1 file should not stop a run, but the user should know.
Files are joined with a 0 byte (end of document).

Split: a file goes to validation when a hash of its path (relative to the --data argument it came from)
falls in the lowest `val_fraction`; deterministic across machines and runs. When that leaves one side
empty (a single file, a handful of files) the last `val_fraction` of the joined stream is used instead.

Sampling: the batch of step s is drawn from a generator seeded by (seed, s), so the data order is a pure
function of the step: resuming at step s gives the same batches as a run that never stopped, and every
rank of a distributed run can take its own disjoint slice of the same global batch.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TOKEN_SUFFIXES = (".npy", ".bin")
DOC_SEPARATOR = b"\x00"


@dataclass
class Corpus:
    train: np.ndarray  # 1-D integer token streams
    val: np.ndarray
    vocab_size: int
    description: str

    def fingerprint(self) -> str:
        """Hash of the tokens and split: a resumed run must see the same data."""
        h = hashlib.blake2b(digest_size=16)
        for arr in (self.train, self.val):
            h.update(str((arr.dtype.str, arr.shape)).encode())
            h.update(np.ascontiguousarray(arr).view(np.uint8).data)
        return h.hexdigest()


def _in_val(rel_path: str, val_fraction: float) -> bool:
    digest = hashlib.sha1(rel_path.replace(os.sep, "/").encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def _read_text(path: Path) -> bytes:
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
        return raw
    except UnicodeDecodeError as exc:
        warnings.warn(
            f"{path} is not valid UTF-8 ({exc.reason} at byte {exc.start}); bad bytes were replaced by U+FFFD",
            stacklevel=3,
        )
        return raw.decode("utf-8", errors="replace").encode("utf-8")


def _split(items: list[tuple[str, np.ndarray]], val_fraction: float, min_len: int) -> tuple[np.ndarray, np.ndarray, str]:
    """items: (relative path, tokens) per file -> (train, val, how it was split)."""
    train = [a for rel, a in items if not _in_val(rel, val_fraction)]
    val = [a for rel, a in items if _in_val(rel, val_fraction)]

    def join(arrs):
        return arrs[0] if len(arrs) == 1 else np.concatenate(arrs)

    if train and val and sum(map(len, train)) >= min_len and sum(map(len, val)) >= min_len:
        return join(train), join(val), f"by file ({len(train)} train, {len(val)} validation)"
    stream = join([a for _, a in items])
    n_val = max(int(len(stream) * val_fraction), min_len)
    return stream[:-n_val], stream[-n_val:], f"last {n_val} tokens of the joined stream are validation"


def _text_items(files: list[tuple[str, Path]]) -> list[tuple[str, np.ndarray]]:
    return [(rel, np.frombuffer(_read_text(p) + DOC_SEPARATOR, dtype=np.uint8)) for rel, p in files]


def stdlib_corpus(val_fraction: float = 0.05, min_len: int = 2) -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (str(p.relative_to(root)), p) for p in root.rglob("*.py")
        if "site-packages" not in p.relative_to(root).parts and p.is_file()
    )
    if not files:
        raise FileNotFoundError(f"no *.py files under the standard library at {root}; pass --data")
    with warnings.catch_warnings(record=True) as caught:  # the stdlib has a few deliberately non-UTF-8 test files
        warnings.simplefilter("always")
        items = _text_items(files)
    if caught:
        warnings.warn(f"default corpus: {len(caught)} stdlib file(s) were not UTF-8 and were decoded with replacement")
    train, val, how = _split(items, val_fraction, min_len)
    return Corpus(train, val, 256, f"Python {sysconfig.get_python_version()} stdlib ({len(files)} files, {how})")


def _expand(paths: list[str]) -> list[tuple[str, Path]]:
    """--data arguments -> (relative path, file) pairs; directories are walked (hidden entries skipped)."""
    if not paths:
        raise ValueError("--data was given no paths")
    out = []
    for arg in paths:
        p = Path(arg)
        if not p.exists():
            raise FileNotFoundError(f"--data: no such file or directory: {arg}")
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise ValueError(f"--data: directory {arg} contains no files")
            out += [(str(Path(p.name) / f.relative_to(p)), f) for f in found]
        else:
            out.append((p.name, p))
    return out


def _load_tokens(path: Path, token_dtype: str) -> np.ndarray:
    if path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    else:
        arr = np.memmap(path, dtype=np.dtype(token_dtype), mode="r")
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"--data: token file {path} must hold a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    if arr.size and arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise ValueError(f"--data: token file {path} contains negative token ids")
    return arr


def load_corpus(data: list[str] | None = None, val_fraction: float = 0.05, min_len: int = 2,
                token_dtype: str = "uint16", vocab_size: int | None = None) -> Corpus:
    """The default corpus (data=None) or the user's files. `min_len`: the fewest tokens each split needs
    (seq_len + 1 for training)."""
    if token_dtype not in ("uint16", "int32"):
        raise ValueError(f"token_dtype must be 'uint16' or 'int32', got {token_dtype!r}")
    if data is None:
        corpus = stdlib_corpus(val_fraction, min_len)
    else:
        files = _expand(data)
        empty = [str(p) for _, p in files if p.stat().st_size == 0]
        if empty:
            raise ValueError(f"--data: empty file(s): {', '.join(empty)}")
        kinds = {p.suffix in TOKEN_SUFFIXES for _, p in files}
        if len(kinds) > 1:
            raise ValueError("--data mixes token files (.npy/.bin) and text files; pass one kind")
        if kinds == {True}:
            items = [(rel, _load_tokens(p, token_dtype)) for rel, p in files]
            vocab = max(int(a.max()) for _, a in items if a.size) + 1
        else:
            items, vocab = _text_items(files), 256
        total = sum(len(a) for _, a in items)
        if total < 2 * min_len:
            raise ValueError(f"--data holds {total} tokens; need at least {2 * min_len} (train and validation each need seq_len + 1)")
        train, val, how = _split(items, val_fraction, min_len)
        corpus = Corpus(train, val, vocab, f"{len(files)} file(s) from --data ({how})")
    if vocab_size is not None:
        if vocab_size < corpus.vocab_size:
            raise ValueError(f"vocab_size={vocab_size} is smaller than the data needs ({corpus.vocab_size}: largest token id + 1)")
        corpus.vocab_size = vocab_size
    for name, arr in (("train", corpus.train), ("validation", corpus.val)):
        if len(arr) < min_len:
            raise ValueError(f"the {name} split has {len(arr)} tokens; need at least {min_len} (seq_len + 1)")
    return corpus


class BatchSampler:
    """Iterator of (x, y) batches of shape [batch_size / world_size, seq_len]: this rank's slice of the
    global batch of step `step`. Its whole state is (seed, step), saved in checkpoints."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} must be divisible by the number of processes ({world_size})")
        if len(tokens) < seq_len + 1:
            raise ValueError(f"need at least seq_len + 1 = {seq_len + 1} tokens, have {len(tokens)}")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.step = 0

    def offsets(self, step: int) -> np.ndarray:
        """Start offsets of the whole global batch of `step` (the same on every rank)."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size, dtype=np.int64)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        per_rank = self.batch_size // self.world_size
        mine = self.offsets(step)[self.rank * per_rank : (self.rank + 1) * per_rank]
        return gather(self.tokens, mine, self.seq_len)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"data sampler seed differs: checkpoint {state['seed']}, now {self.seed}")
        self.step = int(state["step"])


def gather(tokens: np.ndarray, offsets: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([np.asarray(tokens[o : o + seq_len + 1], dtype=np.int64) for o in offsets])
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]


def val_offsets(n_tokens: int, seq_len: int, n_seqs: int) -> np.ndarray:
    """Evenly spaced windows over the whole validation stream: no randomness, same every evaluation."""
    return np.linspace(0, n_tokens - seq_len - 1, num=n_seqs).astype(np.int64)
