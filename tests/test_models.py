"""mmm.models: the GPT with every attention method and several structures, against a plain reference
Transformer, cached generation against the full forward, and save/load (own format and Hugging Face)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmm import BlockDiagConfig, DenseConfig, LowRankConfig, MonarchConfig
from mmm.models import GPT, GPTConfig

torch.set_num_threads(1)  # tiny models: threads only fight over the shared cores

TINY = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, window=4)
METHODS_AND_MAPS = [("exact", "elu"), ("window", "elu"), ("linear", "elu"), ("linear", "favor"), ("linear", "hedgehog"),
                    ("hybrid", "elu"), ("hybrid", "taylor")]
STRUCTURES = [DenseConfig(), LowRankConfig(rank=8), MonarchConfig(nblocks=4), BlockDiagConfig(nblocks=2)]


def tokens(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attention,feature_map", METHODS_AND_MAPS)
@pytest.mark.parametrize("structure", STRUCTURES, ids=lambda c: c.name)
def test_forward_backward(attention, feature_map, structure):
    cfg = GPTConfig(**TINY, attention=attention, feature_map=feature_map, ffn_config=structure, attn_proj_config=structure)
    model = GPT(cfg)
    x, y = tokens(2, 24), tokens(2, 24, seed=2)
    logits, loss = model(x, y)
    assert logits.shape == (2, 24, 256)
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(256)) < 1.0  # near uniform at init
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


# --- a plain Transformer written out by hand: the dense GPT must compute exactly this ----------------


class RefBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.n1, self.n2 = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)
        self.h = h


def ref_rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def ref_rope(x, base=10000.0):  # x [B, T, H, D]; pairs (i, i + D/2)
    T, D = x.shape[1], x.shape[-1]
    out = torch.empty_like(x)
    for pos in range(T):
        for i in range(D // 2):
            theta = pos * base ** (-2 * i / D)
            a, b = x[:, pos, :, i], x[:, pos, :, i + D // 2]
            out[:, pos, :, i] = a * math.cos(theta) - b * math.sin(theta)
            out[:, pos, :, i + D // 2] = b * math.cos(theta) + a * math.sin(theta)
    return out


def ref_forward(emb, blocks, norm_w, idx):
    x = emb[idx]
    B, T, d = x.shape
    for blk in blocks:
        h = ref_rms(x, blk.n1)
        D = d // blk.h
        q, k, v = (w(h).view(B, T, blk.h, D) for w in (blk.wq, blk.wk, blk.wv))
        q, k = ref_rope(q), ref_rope(k)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        att = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(B, T, d)
        x = x + blk.wo(att)
        h = ref_rms(x, blk.n2)
        x = x + blk.down(F.gelu(blk.up(h)))
    return ref_rms(x, norm_w) @ emb.T


def test_dense_gpt_matches_plain_reference_transformer():
    cfg = GPTConfig(**TINY)
    model = GPT(cfg).double()
    d = cfg.d_model
    emb = torch.randn(256, d, dtype=torch.float64) * 0.5
    blocks = [RefBlock(d, cfg.n_heads).double() for _ in range(cfg.n_layers)]
    norm_w = torch.randn(d, dtype=torch.float64)
    with torch.no_grad():  # copy the reference's weights into the GPT
        model.embed.weight.copy_(emb)
        model.norm.weight.copy_(norm_w)
        for blk, ref in zip(model.blocks, blocks):
            blk.attn_norm.weight.copy_(ref.n1)
            blk.ffn_norm.weight.copy_(ref.n2)
            for mine, theirs in ((blk.attn.q, ref.wq), (blk.attn.k, ref.wk), (blk.attn.v, ref.wv), (blk.attn.o, ref.wo),
                                 (blk.ffn.up, ref.up), (blk.ffn.down, ref.down)):
                mine.structure.weight.copy_(theirs.weight)
    idx = tokens(2, 12)
    got = model(idx)
    want = ref_forward(emb, blocks, norm_w, idx)
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-12, err


# --- cached generation ------------------------------------------------------------------------------


@pytest.mark.parametrize("attention,feature_map", METHODS_AND_MAPS)
def test_generation_with_cache_equals_argmax_of_full_forward(attention, feature_map):
    cfg = GPTConfig(**TINY, attention=attention, feature_map=feature_map, ffn_config=LowRankConfig(rank=8))
    model = GPT(cfg).double().eval()
    prompt = tokens(2, 5)
    out = model.generate(prompt, max_new_tokens=10)  # greedy, through the KV cache / recurrent state
    assert out.shape == (2, 15) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        for t in range(5, 15):  # window=4 < t: the window and the hybrid's far part are both exercised
            full = model(out[:, :t])[:, -1]
            assert torch.equal(out[:, t], full.argmax(-1)), f"step {t}: cached generation diverged from the full forward"


def test_cached_logits_equal_full_forward_logits():
    from mmm.models import new_cache

    for attention in ("exact", "window", "linear", "hybrid"):
        model = GPT(GPTConfig(**TINY, attention=attention)).double()
        x = tokens(2, 13)
        cache = new_cache(model.cfg)
        with torch.no_grad():
            parts = [model(x[:, :6], cache=cache), model(x[:, 6:7], cache=cache), model(x[:, 7:], cache=cache)]
            full = model(x)
        err = ((torch.cat(parts, 1) - full).norm() / full.norm()).item()
        assert err < 1e-12, (attention, err)


def test_sequence_longer_than_max_seq_len_is_a_clear_error():
    model = GPT(GPTConfig(**TINY))
    with pytest.raises(ValueError, match=r"33 tokens is longer than max_seq_len=32"):
        model(tokens(1, 33))
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model.generate(tokens(1, 30), max_new_tokens=5)


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        GPTConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="attention must be one of"):
        GPTConfig(attention="flash")
    with pytest.raises(ValueError, match="feature_map must be one of"):
        GPTConfig(attention="linear", feature_map="cosine")
    with pytest.raises(ValueError, match="nblocks"):  # the structure cannot take the model's sizes
        GPTConfig(d_model=32, n_heads=4, ffn_config=MonarchConfig(nblocks=3))
    model = GPT(GPTConfig(**TINY))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
        model(torch.tensor([[1, 300]]))
    with pytest.raises(ValueError, match="int64 tensor of token ids"):
        model(torch.randn(1, 4))


# --- save / load ------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    cfg = GPTConfig(**TINY, attention="hybrid", feature_map="favor", ffn_config=MonarchConfig(nblocks=4))
    model = GPT(cfg)
    path = tmp_path / "model.safetensors"
    model.save(path)
    loaded = GPT.load(path)
    assert loaded.cfg == cfg
    x = tokens(2, 16)
    assert torch.equal(loaded(x), model(x))


def test_huggingface_round_trip_and_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mmm.models.hf import MMMGPTConfig, MMMGPTForCausalLM

    cfg = GPTConfig(**TINY, attention="linear", feature_map="hedgehog", ffn_config=LowRankConfig(rank=8),
                    attn_proj_config=BlockDiagConfig(nblocks=2))
    gpt = GPT(cfg).eval()
    hf = MMMGPTForCausalLM.from_gpt(gpt).eval()
    x = tokens(2, 6)
    assert torch.equal(hf(x).logits, gpt(x))

    hf.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MMMGPTForCausalLM) and isinstance(loaded.config, MMMGPTConfig)
    assert loaded.config.to_gpt_config() == cfg
    assert torch.equal(loaded(x).logits, hf(x).logits)

    # generate() must use the model's recurrent state: after the prompt, one token per forward.
    lengths = []
    hook = loaded.model.register_forward_pre_hook(lambda mod, args, kwargs: lengths.append(args[0].shape[1]), with_kwargs=True)
    out = loaded.generate(x, max_new_tokens=6, do_sample=False)
    hook.remove()
    assert lengths[0] == 6 and set(lengths[1:]) == {1}
    assert torch.equal(out, gpt.generate(x, 6))
    # Without a cache every step reruns the whole sequence; the tokens must not change.
    assert torch.equal(loaded.generate(x, max_new_tokens=6, do_sample=False, use_cache=False), out)
    labels_loss = loaded(x, labels=x).loss
    assert torch.allclose(labels_loss, F.cross_entropy(gpt(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten()))


def test_import_mmm_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, mmm, mmm.models, mmm.train; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
