"""Hugging Face wrapper of `mmm.models.GPT`: `generate`, `save_pretrained` / `from_pretrained`, and
`AutoConfig` / `AutoModelForCausalLM` registration (model_type "mmm_gpt").

Importing this module needs `transformers` (`pip install 'mmm[hf]'`); `import mmm` does not import it.
Import it once before `AutoModelForCausalLM.from_pretrained(path)` so the Auto classes know "mmm_gpt".

`generate` keeps the model's own per-layer cache (KV cache for exact/window, recurrent state for
linear/hybrid) and hands it back to the generation loop, so each new token costs one step, not a rerun
of the whole sequence. Padding is not supported: prompts in a batch must have equal length.

transformers renamed the generation cache from `past_key_values` to `cache` (between 5.17 and 5.24); the
loop carries only the name it knows from one step to the next, yet feeds one token per step either way.
So the output also holds the cache as `past_key_values` where the loop reads that name, and
`prepare_inputs_for_generation` slices the tokens by the cache's own position: a cache the loop failed
to carry costs a full rerun (still the right tokens), never a step that silently starts from an empty state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.utils import ModelOutput
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("mmm.models.hf needs the transformers package: pip install 'mmm[hf]'") from exc

try:
    from transformers.generation.utils import ALL_CACHE_NAMES as _LOOP_CACHE_NAMES
except ImportError:  # older transformers: the loop reads `past_key_values`
    _LOOP_CACHE_NAMES = ("past_key_values",)

from .gpt import GPT, GPTConfig, new_cache

# Newer transformers map `past_key_values` onto `cache` themselves (and warn when it is set).
_ALIAS_CACHE_AS_PAST_KEY_VALUES = "cache" not in _LOOP_CACHE_NAMES

_FIELDS = [f.name for f in dataclasses.fields(GPTConfig)]


class MMMGPTConfig(PretrainedConfig):
    """A `GPTConfig` as a Hugging Face config; structure configs are stored as their dicts."""

    model_type = "mmm_gpt"

    def __init__(self, vocab_size=256, d_model=256, n_layers=4, n_heads=4, max_seq_len=1024, ffn_mult=4,
                 ffn_config=None, attn_proj_config=None, attention="exact", window=256, feature_map="elu",
                 tie_weights=True, rope_base=10000.0, norm_eps=1e-6, **kwargs):
        gpt = GPTConfig(
            vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads, max_seq_len=max_seq_len,
            ffn_mult=ffn_mult, attention=attention, window=window, feature_map=feature_map, tie_weights=tie_weights,
            rope_base=rope_base, norm_eps=norm_eps,
            **{k: v for k, v in (("ffn_config", ffn_config), ("attn_proj_config", attn_proj_config)) if v is not None},
        )  # validates
        for key, value in gpt.to_dict().items():
            setattr(self, key, value)
        # The GPT ties its head to the embedding itself (one parameter); nothing for transformers to tie.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    def to_gpt_config(self) -> GPTConfig:
        return GPTConfig.from_dict({k: getattr(self, k) for k in _FIELDS})

    @classmethod
    def from_gpt_config(cls, cfg: GPTConfig, **kwargs) -> "MMMGPTConfig":
        return cls(**cfg.to_dict(), **kwargs)


class MMMCache:
    """The GPT's per-layer caches, as one object the generation loop can carry between steps."""

    is_compileable = False

    def __init__(self, cfg: GPTConfig):
        self.layers = new_cache(cfg)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].pos


@dataclass
class MMMCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: MMMCache | None = None


class MMMGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MMMGPTConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def __init__(self, config: MMMGPTConfig):
        super().__init__(config)
        self.model = GPT(config.to_gpt_config())
        self.post_init()

    @classmethod
    def from_gpt(cls, gpt: GPT) -> "MMMGPTForCausalLM":
        """Wrap a trained `GPT` (its weights are shared, not copied)."""
        wrapper = cls(MMMGPTConfig.from_gpt_config(gpt.cfg))
        wrapper.model = gpt
        return wrapper

    def _init_weights(self, module) -> None:
        pass  # GPT initialises its own layers (structures have their own schemes)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # we bring our own cache (recurrent state for linear attention)

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None, attention_mask=None,
                                      use_cache=True, **kwargs) -> dict:
        # Ignores the loop's own slicing hints (next_sequence_length, cache_position): the tokens the cache has
        # not seen yet are exactly the ones to feed.
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            input_ids = input_ids[:, cache.get_seq_length():]
        return {"input_ids": input_ids, "cache": cache, "attention_mask": attention_mask, "use_cache": use_cache}

    def forward(self, input_ids=None, attention_mask=None, cache=None, past_key_values=None, use_cache=None,
                labels=None, return_dict=None, **kwargs) -> MMMCausalLMOutput:
        if input_ids is None:
            raise ValueError("input_ids is required (inputs_embeds is not supported)")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise NotImplementedError("padding (attention_mask with zeros) is not supported; give prompts of equal length")
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = MMMCache(self.model.cfg)
        logits = self.model(input_ids, cache=None if cache is None else cache.layers)
        loss = None
        if labels is not None:  # the HF convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        output = MMMCausalLMOutput(loss=loss, logits=logits, cache=cache if use_cache else None)
        if _ALIAS_CACHE_AS_PAST_KEY_VALUES and output.cache is not None:
            output["past_key_values"] = output.cache
        return output


AutoConfig.register(MMMGPTConfig.model_type, MMMGPTConfig, exist_ok=True)
AutoModelForCausalLM.register(MMMGPTConfig, MMMGPTForCausalLM, exist_ok=True)

__all__ = ["MMMGPTConfig", "MMMGPTForCausalLM", "MMMCache"]
