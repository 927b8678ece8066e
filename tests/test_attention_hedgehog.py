"""train_hedgehog: a fitted map beats elu+1 on held-out inputs that look like real attention
(low-rank, clustered queries and keys, so that softmax attention is spiky)."""

import pytest
import torch

import mmm
from mmm.attention.hedgehog import hedgehog_loss, train_hedgehog

B, T, H, D = 2, 96, 2, 16


def clustered_qkv(seed: int):
    """Queries and keys near 6 cluster centres that span a rank-4 subspace (the same centres for every
    seed: one "layer"), plus small noise; fresh tokens per seed."""
    centres_gen = torch.Generator().manual_seed(123)
    basis = torch.randn(H, 4, D, generator=centres_gen)
    centres = 2.0 * torch.randn(H, 6, 4, generator=centres_gen) @ basis / 2.0
    gen = torch.Generator().manual_seed(seed)

    def tokens():
        label = torch.randint(0, 6, (B, T, H), generator=gen)
        return centres[torch.arange(H), label] + 0.3 * torch.randn(B, T, H, D, generator=gen)

    return tokens(), tokens(), torch.randn(B, T, H, D, generator=gen)


def test_trained_map_beats_elu_on_held_out_data():
    q_train, k_train, _ = clustered_qkv(1)
    q, k, v = clustered_qkv(2)
    rows = torch.arange(T)
    fmap = train_hedgehog(q_train, k_train, steps=80, lr=5e-2, sample_rows=48, progress=False)
    assert not fmap.training
    untrained = mmm.attention.HedgehogFeatureMap(D, num_heads=H)
    assert hedgehog_loss(fmap, q, k, rows, True) < hedgehog_loss(untrained, q, k, rows, True)
    trained_err = mmm.attention_error(q, k, v, "linear", feature_map=fmap, sample_rows=None)
    elu_err = mmm.attention_error(q, k, v, "linear", feature_map="elu", sample_rows=None)
    assert trained_err < 0.7 * elu_err, (trained_err, elu_err)


def test_train_hedgehog_bad_arguments():
    q, k, _ = clustered_qkv(1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_hedgehog(q, k, mmm.attention.EluFeatureMap(D), steps=1, progress=False)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        train_hedgehog(q, k, steps=0, progress=False)
