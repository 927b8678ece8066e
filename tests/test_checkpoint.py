"""save_pretrained / load_pretrained: exact round trips, clear errors on a different model, and
atomic writes that never lose the previous checkpoint."""

import json
import os
import struct

import pytest
import torch
from torch import nn

import mmm
from mmm.convert import checkpoint

from test_convert import MODELS, config_params, gpt2, llama, registered, structured_names, tokens


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model, state):
    got = model.state_dict()
    assert set(got) == set(state)
    for k, v in state.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


TIES = {
    "gpt2": lambda m: m.lm_head.weight is m.transformer.wte.weight,
    "bert": lambda m: m.cls.predictions.decoder.weight is m.bert.embeddings.word_embeddings.weight,
    "llama": lambda m: True,  # LlamaConfig does not tie by default
}


@pytest.mark.parametrize("cfg", config_params([mmm.LowRankConfig(rank=8), mmm.MonarchConfig(nblocks=4)]))
@pytest.mark.parametrize("arch", list(MODELS))
def test_round_trip_is_exact(tmp_path, arch, cfg):
    model = MODELS[arch]()
    report = mmm.convert_(model, cfg)
    x = tokens()
    ref = model(x).logits
    state = snapshot(model)
    mmm.save_pretrained(model, tmp_path / "ck")

    fresh = MODELS[arch]()
    assert not torch.equal(fresh(x).logits, ref)  # a different random init, so the load has work to do
    loaded = mmm.load_pretrained(tmp_path / "ck", fresh)
    assert loaded is fresh
    assert structured_names(loaded) == [r.name for r in report.layers]
    for r in report.layers:
        assert loaded.get_submodule(r.name).config == cfg
    assert_same_state(loaded, state)
    assert torch.equal(loaded(x).logits, ref)
    assert TIES[arch](loaded)


def test_mixed_structures_round_trip(tmp_path):
    every = {
        "q_proj": mmm.LowRankConfig(rank=4),
        "k_proj": mmm.KroneckerConfig(terms=2),
        "v_proj": mmm.CirculantConfig(),
        "o_proj": mmm.ToeplitzConfig(),
        "gate_proj": mmm.LDRConfig(rank=2),
        "mlp.up_proj": mmm.MonarchConfig(nblocks=4),
        r".*\.down_proj": mmm.BlockDiagConfig(nblocks=4),
    }
    cfg = {k: c for k, c in every.items() if registered(c)}  # structures still being written are left out
    assert len(cfg) >= 2
    model = llama()
    mmm.convert_(model, cfg)
    mmm.save_pretrained(model, tmp_path / "ck")
    loaded = mmm.load_pretrained(tmp_path / "ck", llama())
    for name in structured_names(model):
        assert loaded.get_submodule(name).config == model.get_submodule(name).config
    x = tokens()
    assert torch.equal(loaded(x).logits, model(x).logits)

    # Loading onto the same layers converted differently replaces them.
    other = llama()
    mmm.convert_(other, mmm.LowRankConfig(rank=2), target_modules=structured_names(model))
    mmm.load_pretrained(tmp_path / "ck", other)
    assert structured_names(other) == structured_names(model)
    assert torch.equal(other(x).logits, model(x).logits)

    # A layer structured in the model but plain in the checkpoint cannot be turned back: an error.
    other = llama()
    mmm.convert_(other, mmm.LowRankConfig(rank=2), target_modules=r".*")
    with pytest.raises(ValueError, match="lm_head: structured in the model but not in the checkpoint"):
        mmm.load_pretrained(tmp_path / "ck", other)


def test_files_are_safetensors_and_json_only(tmp_path):
    model = gpt2()
    report = mmm.convert_(model, mmm.LowRankConfig(rank=8))
    path = mmm.save_pretrained(model, tmp_path / "nested" / "ck")
    assert sorted(os.listdir(path)) == ["mmm_config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path / "nested")) == ["ck"]  # no temporary directory left behind

    meta = json.loads((path / "mmm_config.json").read_text())
    assert meta["format_version"] == 1
    assert list(meta["layers"]) == [r.name for r in report.layers]
    assert meta["layers"]["transformer.h.0.mlp.c_fc"] == {
        "in_features": 64, "out_features": 256, "bias": True, "config": {"structure": "lowrank", "rank": 8}}

    raw = (path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header length, JSON header, raw tensor bytes
    header = json.loads(raw[8:8 + n])
    names = set(header) - {"__metadata__"}
    # The tied head and embedding are stored once.
    assert names == set(model.state_dict()) - {"transformer.wte.weight"}
    assert not raw.startswith(b"PK") and not raw.startswith(b"\x80")  # not a torch zip / pickle


def test_load_into_fewer_layers_is_a_clear_error(tmp_path):
    model = gpt2(n_layer=2)
    mmm.convert_(model, mmm.LowRankConfig(rank=8))
    mmm.save_pretrained(model, tmp_path / "ck")
    small = gpt2(n_layer=1)
    state = snapshot(small)
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.attn\.c_attn: the model has no such module") as e:
        mmm.load_pretrained(tmp_path / "ck", small)
    assert "does not fit this model" in str(e.value)
    assert structured_names(small) == []
    assert_same_state(small, state)


def test_load_into_more_layers_lists_missing_tensors(tmp_path):
    model = gpt2(n_layer=2)
    mmm.convert_(model, mmm.LowRankConfig(rank=8))
    mmm.save_pretrained(model, tmp_path / "ck")
    big = gpt2(n_layer=3)
    state = snapshot(big)
    with pytest.raises(ValueError, match="missing from the checkpoint") as e:
        mmm.load_pretrained(tmp_path / "ck", big)
    assert "transformer.h.2.mlp.c_fc.weight" in str(e.value)
    assert structured_names(big) == []  # the swapped layers were put back
    assert_same_state(big, state)


def test_load_lists_unexpected_tensors_and_shape_mismatches(tmp_path):
    model = gpt2(n_layer=2)
    mmm.convert_(model, mmm.LowRankConfig(rank=8), target_modules=r"transformer\.h\.0\..*")
    mmm.save_pretrained(model, tmp_path / "ck")
    with pytest.raises(ValueError, match="unexpected tensor") as e:
        mmm.load_pretrained(tmp_path / "ck", gpt2(n_layer=1))
    assert "transformer.h.1.attn.c_attn.weight" in str(e.value)

    narrow = gpt2(n_embd=32)
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn: the model's layer is 96x32 \(out x in\), the checkpoint's is 192x64"):
        mmm.load_pretrained(tmp_path / "ck", narrow)
    assert structured_names(narrow) == []


def test_load_into_another_architecture_or_a_non_checkpoint(tmp_path):
    model = llama()
    mmm.convert_(model, mmm.LowRankConfig(rank=4))
    mmm.save_pretrained(model, tmp_path / "ck")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: the model has no such module"):
        mmm.load_pretrained(tmp_path / "ck", gpt2())
    # A checkpoint of a plain model (no structured layer) still refuses a model with other tensors.
    mmm.save_pretrained(nn.Sequential(nn.Linear(4, 4)), tmp_path / "plain")
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        mmm.load_pretrained(tmp_path / "plain", nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    with pytest.raises(FileNotFoundError, match="mmm_config.json is missing"):
        mmm.load_pretrained(tmp_path, llama())


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    first = gpt2()
    mmm.convert_(first, mmm.LowRankConfig(rank=8))
    path = mmm.save_pretrained(first, tmp_path / "ck")
    (path / "tokenizer.json").write_text("{}")  # someone else's file in the checkpoint directory
    before = {f: (path / f).read_bytes() for f in os.listdir(path)}

    second = gpt2()
    mmm.convert_(second, mmm.LowRankConfig(rank=4))

    def fails_halfway(model, filename, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save_model", fails_halfway)
        with pytest.raises(OSError, match="disk full"):
            mmm.save_pretrained(second, path)
    assert {f: (path / f).read_bytes() for f in os.listdir(path)} == before
    assert os.listdir(tmp_path) == ["ck"]

    # The last step (the new directory taking the old one's place) failing also keeps the old one.
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in os.fspath(src):
            raise OSError("rename failed")
        real_rename(src, dst)

    with monkeypatch.context() as m:
        m.setattr(checkpoint.os, "rename", rename)
        with pytest.raises(OSError, match="rename failed"):
            mmm.save_pretrained(second, path)
    assert {f: (path / f).read_bytes() for f in os.listdir(path)} == before
    assert os.listdir(tmp_path) == ["ck"]

    # A save that succeeds replaces our files and keeps the others.
    mmm.save_pretrained(second, path)
    assert sorted(os.listdir(path)) == ["mmm_config.json", "model.safetensors", "tokenizer.json"]
    assert (path / "tokenizer.json").read_text() == "{}"
    assert os.listdir(tmp_path) == ["ck"]
    loaded = mmm.load_pretrained(path, gpt2())
    x = tokens()
    assert torch.equal(loaded(x).logits, second(x).logits)


@pytest.mark.gpu
def test_cuda_bf16_convert_and_round_trip(tmp_path):
    model = gpt2().to("cuda", torch.bfloat16)
    report = mmm.convert_(model, mmm.LowRankConfig(rank=8))
    assert len(report) == 8
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cuda", torch.bfloat16)}
    x = tokens().cuda()
    ref = model(x).logits
    mmm.save_pretrained(model, tmp_path / "ck")
    loaded = mmm.load_pretrained(tmp_path / "ck", gpt2().to("cuda", torch.bfloat16))
    assert {(p.device.type, p.dtype) for p in loaded.parameters()} == {("cuda", torch.bfloat16)}
    assert torch.equal(loaded(x).logits, ref)
