"""`mmm train`: train an MMM-native GPT (or compare it with a dense one) from the command line.

    mmm train --d-model 512 --n-layers 8 --ffn-structure monarch:nblocks=4 --steps 2000
    mmm train --compare dense,mmm --minutes 5 --ffn-structure monarch:nblocks=4
    torchrun --nproc_per_node=2 -m mmm train --fsdp ...
"""

from __future__ import annotations

import argparse
import dataclasses

from ..configs import _REGISTRY, StructureConfig
from ..models.gpt import ATTENTION_METHODS, GPTConfig


def _parse_value(text: str):
    low = text.lower()
    if low == "none":
        return None
    if low in ("true", "false"):
        return low == "true"
    if "x" in low and all(part.isdigit() for part in low.split("x")):
        return tuple(int(part) for part in low.split("x"))  # 16x16 -> (16, 16), e.g. Kronecker factors
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_structure(spec: str) -> StructureConfig:
    """'monarch:nblocks=4', 'lowrank:rank=256', 'kronecker:terms=2,in_factors=16x32', 'dense' -> a config."""
    name, _, args = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in _REGISTRY:
        raise ValueError(f"unknown structure {name!r} in {spec!r}; known structures: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in fields:
            raise ValueError(
                f"bad structure option {item!r} in {spec!r}: expected key=value with key in "
                f"{fields or 'no options'} for {name!r}"
            )
        kwargs[key] = _parse_value(value.strip())
    return cls(**kwargs)


def _structure_arg(spec: str) -> StructureConfig:
    try:
        return parse_structure(spec)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an MMM-native GPT on the Python stdlib or your data (or compare it with a dense one)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m = p.add_argument_group("model")
    m.add_argument("--d-model", type=int, default=256)
    m.add_argument("--n-layers", type=int, default=4)
    m.add_argument("--n-heads", type=int, default=4)
    m.add_argument("--ffn-mult", type=int, default=4, help="FFN hidden width = ffn-mult x d-model")
    m.add_argument("--ffn-structure", type=_structure_arg, default="dense",
                   help="structure of both FFN matrices, e.g. dense, monarch:nblocks=4, lowrank:rank=256")
    m.add_argument("--attn-proj-structure", type=_structure_arg, default="dense",
                   help="structure of the q/k/v/o projections (same syntax)")
    m.add_argument("--attention", choices=ATTENTION_METHODS, default="exact")
    m.add_argument("--window", type=int, default=256, help="window of window/hybrid attention")
    m.add_argument("--feature-map", default="elu", help="feature map of linear/hybrid attention (elu, relu, favor, taylor, hedgehog)")
    m.add_argument("--max-seq-len", type=int, default=None, help="longest sequence the model supports (default: --seq-len)")
    m.add_argument("--vocab-size", type=int, default=None, help="default: what the data needs (256 for text)")
    t = p.add_argument_group("training")
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--batch-size", type=int, default=16, help="global batch in sequences (split across processes)")
    t.add_argument("--steps", type=int, default=None, help="default 1000; with --compare/--minutes a cap (default none)")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--data", nargs="+", default=None,
                   help="text files / directories (byte-level; non-UTF-8 bytes are replaced, with a warning naming the file) "
                        "or .npy / .bin token files; default: the Python stdlib's *.py files")
    t.add_argument("--token-dtype", choices=("uint16", "int32"), default="uint16", help="dtype of .bin token files")
    t.add_argument("--out", default="runs/train")
    t.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint (default: OUT/checkpoint.safetensors)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--fsdp", action="store_true", help="shard with FSDP2 under torchrun (default: DDP)")
    t.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="compute on CUDA: bf16 autocast (default) or plain fp32 (for exact comparisons)")
    t.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    t.add_argument("--val-every", type=int, default=100, help="steps between validations (0: only at the end)")
    t.add_argument("--val-batches", type=int, default=8)
    t.add_argument("--ckpt-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    c = p.add_argument_group("comparison")
    c.add_argument("--compare", default=None, help="e.g. dense,mmm: train each for --minutes and plot val loss vs time")
    c.add_argument("--minutes", type=float, default=None, help="wall-clock training budget per model")
    p.set_defaults(func=run)


def configs_from_args(args, vocab_size: int):
    from .loop import TrainConfig

    model = GPTConfig(
        vocab_size=args.vocab_size or vocab_size, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
        max_seq_len=args.max_seq_len or args.seq_len, ffn_mult=args.ffn_mult,
        ffn_config=_as_config(args.ffn_structure), attn_proj_config=_as_config(args.attn_proj_structure),
        attention=args.attention, window=args.window, feature_map=args.feature_map,
    )
    budget = args.compare is not None or args.minutes is not None
    steps = args.steps if args.steps is not None else (10**9 if budget else 1000)
    return TrainConfig(
        model=model, data=args.data, out=args.out, batch_size=args.batch_size, seq_len=args.seq_len, steps=steps,
        lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
        val_every=args.val_every, val_batches=args.val_batches, ckpt_every=args.ckpt_every, compile=args.compile,
        fsdp=args.fsdp, resume=args.resume, max_seconds=None if args.minutes is None else 60.0 * args.minutes,
        device=args.device, token_dtype=args.token_dtype, progress=not args.no_progress, precision=args.precision,
    )


def _as_config(value) -> StructureConfig:
    return value if isinstance(value, StructureConfig) else parse_structure(value)


def run(args) -> int:
    from .compare import compare, format_summary, parse_names
    from .data import load_corpus
    from .distributed import setup, teardown
    from .loop import train

    if args.compare is not None:
        names = parse_names(args.compare)
        if args.minutes is None:
            raise SystemExit("mmm train: --compare needs --minutes (the wall-clock budget of each model)")
        if args.resume:
            raise SystemExit("mmm train: --resume cannot be combined with --compare")
    try:
        d = setup(args.device)
    except RuntimeError as exc:  # e.g. more processes per node than GPUs
        raise SystemExit(f"mmm train: {exc}") from None
    clean = False
    try:
        corpus = load_corpus(args.data, min_len=args.seq_len + 1, token_dtype=args.token_dtype, vocab_size=args.vocab_size)
        cfg = configs_from_args(args, corpus.vocab_size)
        if d.is_main:
            print(f"data: {corpus.description}; {len(corpus.train):,} train / {len(corpus.val):,} validation tokens")
        if args.compare is not None:
            summary = compare(cfg, names, args.minutes, corpus=corpus, dist_info=d)
            if d.is_main:
                print(format_summary(summary))
                print(f"wrote {cfg.out}/compare.png and {cfg.out}/compare.json")
        else:
            log = train(cfg, corpus=corpus, dist_info=d)
            if d.is_main:
                tps = f"{log['tokens_per_s']:,.0f} tok/s" if log["tokens_per_s"] else "n/a tok/s"
                print(f"done: {log['steps_done']} steps, final val loss {log['final_val_loss']:.4f}, {tps}, "
                      f"{log['params'] / 1e6:.2f}M params; wrote {cfg.out}/log.json, loss.png, checkpoint.safetensors")
        clean = True
    except (ValueError, FileNotFoundError) as exc:  # bad input: the message says what to change
        raise SystemExit(f"mmm train: {exc}") from None
    finally:
        teardown(d, clean)
    return 0
