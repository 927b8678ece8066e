"""Training MMM-native models: data (default corpus: the Python stdlib), the loop (AdamW, cosine LR,
bf16 on CUDA, atomic checkpoints, exact resume), DDP / FSDP2 through torchrun, and the dense-vs-MMM
comparison at equal wall-clock time. The `mmm train` command drives all of it."""

from .cli import parse_structure
from .compare import compare
from .data import BatchSampler, Corpus, load_corpus
from .loop import StopTraining, TrainConfig, train

__all__ = ["TrainConfig", "train", "compare", "load_corpus", "Corpus", "BatchSampler", "StopTraining", "parse_structure"]
