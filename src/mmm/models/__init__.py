"""MMM-native language models.

`GPT` / `GPTConfig`: a GPT-style causal LM whose projections can be structured and whose attention can
be exact, window, linear or hybrid. `mmm.models.hf` (imported on demand, needs `transformers`) wraps it
as a Hugging Face `PreTrainedModel` and registers it with `AutoModelForCausalLM`.
"""

from .gpt import ATTENTION_METHODS, GPT, GPTConfig, new_cache

__all__ = ["GPT", "GPTConfig", "ATTENTION_METHODS", "new_cache"]
