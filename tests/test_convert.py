"""convert_: which layers it swaps, what it reports, and that outputs survive where they must.

Expected values (names, parameter counts, errors) are recomputed here from the dense weights and
the configs, not read back from the converted layers."""

import json
import math
import re

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import mmm
from mmm.structures import structure_class

from conftest import rel_err


def gpt2(n_layer=2, n_embd=64):
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def llama(num_hidden_layers=2):
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=num_hidden_layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(cfg).eval()


def bert():
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=128)
    return BertForMaskedLM(cfg).eval()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These matrices are tiny: on a busy machine, waiting for a second thread costs far more than it saves.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


MODELS = {"gpt2": gpt2, "llama": llama, "bert": bert}
HEADS = {"gpt2": {"lm_head"}, "llama": {"lm_head"}, "bert": {"cls.predictions.transform.dense", "cls.predictions.decoder"}}


def registered(cfg) -> bool:
    try:
        structure_class(cfg)
        return True
    except ValueError:
        return False


def config_params(cfgs):
    """pytest params over configs, skipping a structure only if it is not registered in mmm.structures."""
    return [
        pytest.param(c, id=c.describe(), marks=() if registered(c) else pytest.mark.skip(reason=f"{c.name} is not registered"))
        for c in cfgs
    ]


def dense_layers(model):
    """name -> (weight [out, in], bias) for every nn.Linear and Conv1D, copied."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            w = m.weight
        elif isinstance(m, Conv1D):
            w = m.weight.t()
        else:
            continue
        out[name] = (w.detach().clone(), None if m.bias is None else m.bias.detach().clone())
    return out


def expected_params(cfg, in_f, out_f):
    """Structure parameter count from the config's definition."""
    if isinstance(cfg, mmm.DenseConfig):
        return in_f * out_f
    if isinstance(cfg, mmm.LowRankConfig):
        return cfg.rank * (in_f + out_f)
    if isinstance(cfg, mmm.BlockDiagConfig):
        return in_f * out_f // cfg.nblocks
    if isinstance(cfg, mmm.MonarchConfig):  # L: b blocks [b*r, in/b]; R: b blocks [out/b, b*r]
        return cfg.nblocks * cfg.resolved_block_rank(in_f, out_f) * (in_f + out_f)
    raise AssertionError(cfg)


def tokens():
    return torch.randint(0, 128, (2, 12))


def structured_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, mmm.StructuredLinear)]


CONFIGS = [mmm.DenseConfig(), mmm.LowRankConfig(rank=8), mmm.BlockDiagConfig(nblocks=4), mmm.MonarchConfig(nblocks=4)]


@pytest.mark.parametrize("cfg", config_params(CONFIGS))
@pytest.mark.parametrize("arch", list(MODELS))
def test_report_rows_match_independent_computation(arch, cfg):
    model = MODELS[arch]()
    before = dense_layers(model)
    report = mmm.convert_(model, cfg)

    expected_names = [n for n in before if n not in HEADS[arch]]
    assert [r.name for r in report.layers] == expected_names
    assert structured_names(model) == expected_names
    for row in report.layers:
        w, b = before[row.name]
        layer = model.get_submodule(row.name)
        assert layer.config == cfg and row.structure == cfg.describe()
        assert (row.out_features, row.in_features) == tuple(w.shape)
        assert row.params_before == w.numel() + (0 if b is None else b.numel())
        n_struct = expected_params(cfg, w.shape[1], w.shape[0])
        assert row.params_after == n_struct + (0 if b is None else b.numel())
        assert row.params_after == sum(p.numel() for p in layer.parameters())
        approx = layer.to_dense().detach().double()
        assert approx.dtype == torch.float64 and layer.to_dense().dtype == w.dtype
        err = float((approx - w.double()).norm() / w.double().norm())
        assert row.error == pytest.approx(err, rel=1e-6, abs=1e-9)
        if isinstance(cfg, mmm.DenseConfig):
            assert row.error == 0.0
        if isinstance(cfg, mmm.LowRankConfig):  # Eckart-Young: the error is the tail of the spectrum
            s = torch.linalg.svdvals(w.double())
            assert row.error == pytest.approx(float(s[cfg.rank:].norm() / s.norm()), rel=1e-5)
        if isinstance(cfg, mmm.BlockDiagConfig):  # the best block-diagonal matrix keeps the diagonal blocks
            nb, (o, i) = cfg.nblocks, w.shape
            blocks = torch.block_diag(*[w[k * o // nb:(k + 1) * o // nb, k * i // nb:(k + 1) * i // nb] for k in range(nb)])
            assert row.error == pytest.approx(float((w - blocks).double().norm() / w.double().norm()), rel=1e-5)
        if b is not None:
            assert torch.equal(layer.bias, b)
    assert report.params_before == sum(r.params_before for r in report.layers)
    assert report.params_after == sum(r.params_after for r in report.layers)
    assert report.max_error == max(r.error for r in report.layers)
    for head in HEADS[arch]:  # output heads stay dense by default
        assert isinstance(model.get_submodule(head), nn.Linear)
    if arch == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight
    logits = model(tokens()).logits
    assert logits.shape == (2, 12, 128) and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", list(MODELS))
def test_dense_config_keeps_outputs(arch):
    model = MODELS[arch]()
    x = tokens()
    ref = model(x).logits
    report = mmm.convert_(model, mmm.DenseConfig())
    assert len(report) > 0 and report.max_error == 0.0
    assert rel_err(model(x).logits, ref) < 1e-6


def structured_weight(cfg, out_f, in_f):
    """A random [out, in] matrix that lies exactly in cfg's structure."""
    if isinstance(cfg, mmm.LowRankConfig):
        return torch.randn(out_f, cfg.rank) @ torch.randn(cfg.rank, in_f) / math.sqrt(cfg.rank * in_f)
    if isinstance(cfg, mmm.BlockDiagConfig):
        nb = cfg.nblocks
        return torch.block_diag(*[torch.randn(out_f // nb, in_f // nb) for _ in range(nb)]) / math.sqrt(in_f // nb)
    # Others: the dense form of a randomly initialised structured layer.
    layer = mmm.StructuredLinear(in_f, out_f, cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer.to_dense().detach()


@pytest.mark.parametrize("cfg", config_params([mmm.LowRankConfig(rank=8), mmm.BlockDiagConfig(nblocks=4), mmm.MonarchConfig(nblocks=4)]))
@pytest.mark.parametrize("arch", list(MODELS))
def test_weights_already_structured_keep_outputs(arch, cfg):
    model = MODELS[arch]()
    with torch.no_grad():
        for name, m in model.named_modules():
            if name in HEADS[arch]:
                continue
            if isinstance(m, nn.Linear):
                m.weight.copy_(structured_weight(cfg, m.out_features, m.in_features))
            elif isinstance(m, Conv1D):
                m.weight.copy_(structured_weight(cfg, m.weight.shape[1], m.weight.shape[0]).t())
    x = tokens()
    ref = model(x).logits
    n_targets = len(dense_layers(model)) - len(HEADS[arch])
    report = mmm.convert_(model, cfg)
    assert len(report) == n_targets
    assert report.max_error < 1e-5
    assert rel_err(model(x).logits, ref) < 1e-4


def test_gpt2_conv1d_is_transposed_correctly():
    model = gpt2()
    conv = model.transformer.h[0].attn.c_attn
    assert isinstance(conv, Conv1D) and conv.weight.shape == (64, 192)  # stored [in, out]
    w = conv.weight.detach().clone()
    mmm.convert_(model, mmm.DenseConfig(), target_modules=["h.0.attn.c_attn"])
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, mmm.StructuredLinear) and (layer.in_features, layer.out_features) == (64, 192)
    assert torch.equal(layer.to_dense(), w.t())

    # A bare Conv1D in a plain container, low rank: matches the explicit rank-2 truncation.
    seq = nn.Sequential(Conv1D(12, 8), nn.ReLU())
    x = torch.randn(5, 8)
    w = seq[0].weight.detach().t().double()
    mmm.convert_(seq, mmm.LowRankConfig(rank=2))
    P, S, Qh = torch.linalg.svd(w)
    ref = torch.relu(x.double() @ (P[:, :2] * S[:2] @ Qh[:2]).t() + seq[0].bias.double())
    assert rel_err(seq(x), ref) < 1e-5


def test_target_modules_list_suffix_and_full_name():
    model = llama()
    report = mmm.convert_(model, mmm.LowRankConfig(rank=4), target_modules=["q_proj", "model.layers.1.mlp.down_proj"])
    assert [r.name for r in report.layers] == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    assert structured_names(model) == [r.name for r in report.layers]
    # A suffix matches only at a '.' boundary: "proj" is not a suffix of "q_proj".
    with pytest.raises(ValueError, match="'proj' matches no linear layer"):
        mmm.convert_(llama(), mmm.LowRankConfig(rank=4), target_modules=["proj"])


def test_target_modules_regex_is_a_full_match():
    report = mmm.convert_(llama(), mmm.LowRankConfig(rank=4), target_modules=r".*\.mlp\..*")
    assert [r.name for r in report.layers] == [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
    with pytest.raises(ValueError, match="matches no linear layer"):
        mmm.convert_(llama(), mmm.LowRankConfig(rank=4), target_modules="mlp")


def test_all_linear_equals_default_and_leaves_heads():
    a, b = mmm.convert_(bert(), mmm.LowRankConfig(rank=4)), mmm.convert_(bert(), mmm.LowRankConfig(rank=4), target_modules="all-linear")
    assert [r.name for r in a.layers] == [r.name for r in b.layers]
    assert len(a) == 12 and not any(r.name.startswith("cls.") for r in a.layers)


def test_exclude_modules_and_filter_fn():
    report = mmm.convert_(llama(), mmm.LowRankConfig(rank=4), exclude_modules=["down_proj", "layers.1.self_attn.o_proj"])
    names = [r.name for r in report.layers]
    assert len(names) == 14 - 2 - 1 and not any(n.endswith("down_proj") for n in names)
    assert "model.layers.1.self_attn.o_proj" not in names and "model.layers.0.self_attn.o_proj" in names

    report = mmm.convert_(llama(), mmm.LowRankConfig(rank=4), exclude_modules=r"model\.layers\.1\..*")
    assert [r.name for r in report.layers] == [n for n in dense_layers(llama()) if n.startswith("model.layers.0.")]

    seen = []

    def wide_outputs(module, name):
        seen.append(name)
        return module.out_features == 64

    report = mmm.convert_(llama(), mmm.LowRankConfig(rank=4), filter_fn=wide_outputs)
    assert {r.name.rsplit(".", 1)[1] for r in report.layers} == {"q_proj", "o_proj", "down_proj"}
    assert len(report) == 6 and "lm_head" not in seen  # filter_fn narrows the targets, it does not widen them


def test_head_converted_only_when_named():
    model = llama()
    report = mmm.convert_(model, mmm.LowRankConfig(rank=4), target_modules=["lm_head"])
    assert [r.name for r in report.layers] == ["lm_head"]
    tied = gpt2()
    with pytest.warns(UserWarning, match="tie is broken"):
        mmm.convert_(tied, mmm.LowRankConfig(rank=4), target_modules=["lm_head"])


def test_bad_names_list_the_closest_existing_ones():
    model = llama()
    with pytest.raises(ValueError, match="target_modules: 'q_prj'") as e:
        mmm.convert_(model, mmm.LowRankConfig(rank=4), target_modules=["q_prj", "k_proj"])
    assert "q_proj" in str(e.value)
    with pytest.raises(ValueError, match="exclude_modules: 'gate_prj'") as e:
        mmm.convert_(model, mmm.LowRankConfig(rank=4), exclude_modules=["gate_prj"])
    assert "gate_proj" in str(e.value)
    assert structured_names(model) == []


def test_config_dict_and_callable():
    model = llama()
    cfg = {
        "model.layers.0.self_attn.q_proj": mmm.DenseConfig(),  # first matching key wins
        "q_proj": mmm.LowRankConfig(rank=4),
        r".*\.mlp\.(gate|up)_proj": mmm.LowRankConfig(rank=2),
        "o_proj": None,  # explicitly left dense
    }
    report = mmm.convert_(model, cfg)
    got = {r.name: r.structure for r in report.layers}
    assert got == {
        "model.layers.0.self_attn.q_proj": "dense()",
        "model.layers.1.self_attn.q_proj": "lowrank(rank=4)",
        **{f"model.layers.{i}.mlp.{p}_proj": "lowrank(rank=2)" for i in range(2) for p in ("gate", "up")},
    }
    assert isinstance(model.model.layers[0].self_attn.o_proj, nn.Linear)

    report = mmm.convert_(llama(), lambda name, module: mmm.LowRankConfig(rank=3) if module.out_features == 32 else None)
    assert [r.name.rsplit(".", 1)[1] for r in report.layers] == ["k_proj", "v_proj"] * 2

    with pytest.raises(ValueError, match="cfg: 'q_prj' matches no linear layer"):
        mmm.convert_(llama(), {"q_prj": mmm.DenseConfig()})
    with pytest.raises(ValueError, match="output heads are left out by default"):
        mmm.convert_(llama(), {"lm_head": mmm.DenseConfig()})
    with pytest.raises(TypeError, match="cfg must be"):
        mmm.convert_(llama(), "lowrank")


def test_incompatible_shape_names_the_layer_or_is_skipped():
    model = llama()
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.self_attn\.k_proj: LowRankConfig\(rank=40\) cannot take a 32x64"):
        mmm.convert_(model, mmm.LowRankConfig(rank=40))
    assert structured_names(model) == []  # nothing half-converted

    report = mmm.convert_(model, mmm.LowRankConfig(rank=40), skip_incompatible=True)
    assert [n for n, _ in report.skipped] == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("k_proj", "v_proj")]
    assert len(report) == 10 and "rank must be at most" in report.skipped[0][1]
    assert "skipped model.layers.0.self_attn.k_proj" in str(report)


def test_failure_midway_restores_every_layer():
    model = llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj: weight contains 1 NaN"):
        mmm.convert_(model, mmm.LowRankConfig(rank=4))
    assert structured_names(model) == []


def test_report_str_and_dict():
    report = mmm.convert_(gpt2(), mmm.LowRankConfig(rank=8))
    text = str(report)
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "shape", "(out", "x", "in)", "structure", "params", "before", "params", "after", "error"]
    assert len({len(line) for line in lines}) == 1  # aligned: the last column is right-aligned
    assert lines[-1].startswith("total (8 layers)") and f"{report.params_after:,}" in lines[-1]
    assert re.search(r"^transformer\.h\.1\.mlp\.c_proj +64x256 +lowrank\(rank=8\) +16,448 +2,624 ", text, re.M)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["layers"] == report.rows and data["totals"]["params_before"] == report.params_before
    assert report["transformer.h.0.attn.c_attn"].out_features == 192


def test_keeps_dtype_device_mode_and_shared_modules():
    model = gpt2().to(torch.bfloat16)
    mmm.convert_(model, mmm.LowRankConfig(rank=8))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.transformer.h[0].attn.c_attn.training

    shared = nn.Linear(6, 6)
    seq = nn.Sequential(shared, nn.Tanh(), shared)
    x = torch.randn(3, 6)
    ref = seq(x)
    report = mmm.convert_(seq, mmm.DenseConfig())
    assert len(report) == 1 and seq[0] is seq[2] and isinstance(seq[2], mmm.StructuredLinear)
    assert rel_err(seq(x), ref) < 1e-6
