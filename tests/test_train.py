"""mmm.train: data, exact resume, checkpoint safety, distributed (gloo) equivalence, compare and CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from mmm.models import GPTConfig
from mmm.train import BatchSampler, StopTraining, TrainConfig, load_corpus, parse_structure, train
from mmm.train import checkpoint as ckpt
from mmm.train.distributed import check_gpu_count
from mmm.train.loop import learning_rate

torch.set_num_threads(1)  # tiny models: threads only fight over the shared cores

TINY_MODEL = GPTConfig(d_model=32, n_layers=2, n_heads=4, max_seq_len=32)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    """A few small Python-like text files (deterministic content)."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "for", "in", "if", "else", "x", "y", "(", ")", ":", "\n", "    "]
    for i in range(12):
        text = " ".join(rng.choice(words, size=900))
        (d / f"mod{i}.py").write_text(f"# file {i}\n{text}\n")
    return d


def tiny(out, data, **kw) -> TrainConfig:
    base = dict(model=TINY_MODEL, data=[str(data)], out=str(out), batch_size=4, seq_len=32, steps=6, warmup=2,
                val_every=3, val_batches=2, progress=False)
    base.update(kw)
    return TrainConfig(**base)


# --- data ---------------------------------------------------------------------------------------------


def test_default_corpus_is_the_stdlib_split_by_file():
    corpus = load_corpus(None, min_len=33)
    assert corpus.vocab_size == 256
    assert "stdlib" in corpus.description and "by file" in corpus.description
    assert len(corpus.train) > 1_000_000 and len(corpus.val) > 10_000
    # Split by a hash of the relative path: about 5% of the files, deterministic.
    from mmm.train.data import _in_val

    paths = [f"pkg/mod{i}.py" for i in range(2000)]
    share = sum(_in_val(p, 0.05) for p in paths) / len(paths)
    assert 0.03 < share < 0.07 and [_in_val(p, 0.05) for p in paths] == [_in_val(p, 0.05) for p in paths]
    # Real Python source: bytes decode to text containing "def ".
    assert b"def " in corpus.val[:100_000].tobytes()


def test_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory: .*missing"):
        load_corpus([str(tmp_path / "missing")])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty file"):
        load_corpus([str(empty)])
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="contains no files"):
        load_corpus([str(tmp_path / "emptydir")])
    short = tmp_path / "short.txt"
    short.write_text("abc")
    with pytest.raises(ValueError, match="need at least"):
        load_corpus([str(short)], min_len=33)
    np.save(tmp_path / "toks.npy", np.arange(100, dtype=np.int32))
    with pytest.raises(ValueError, match="mixes token files"):
        load_corpus([str(short), str(tmp_path / "toks.npy")])


def test_non_utf8_text_is_replaced_with_a_warning_naming_the_file(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 40)
    with pytest.warns(UserWarning, match=r"latin1\.txt is not valid UTF-8"):
        corpus = load_corpus([str(bad)], min_len=9)
    data = np.concatenate([corpus.train, corpus.val]).tobytes()
    assert "\ufffd".encode() in data and b"\xe9 " not in data


def test_token_files(tmp_path):
    a = np.random.default_rng(0).integers(0, 1000, size=5000).astype(np.uint16)
    np.save(tmp_path / "a.npy", a)
    a.astype(np.int32).tofile(tmp_path / "b.bin")
    corpus = load_corpus([str(tmp_path / "a.npy")], min_len=33)
    assert corpus.vocab_size == int(a.max()) + 1
    assert np.array_equal(np.concatenate([corpus.train, corpus.val]), a)
    corpus32 = load_corpus([str(tmp_path / "b.bin")], min_len=33, token_dtype="int32")
    assert np.array_equal(np.concatenate([corpus32.train, corpus32.val]), a)
    with pytest.raises(ValueError, match="smaller than the data needs"):
        load_corpus([str(tmp_path / "a.npy")], min_len=33, vocab_size=10)


def test_sampler_is_a_function_of_the_step_and_ranks_split_the_global_batch():
    toks = np.random.default_rng(0).integers(0, 256, size=10_000).astype(np.uint8)
    one = BatchSampler(toks, batch_size=4, seq_len=16, seed=3)
    x5, y5 = one.batch(5)
    assert torch.equal(x5[:, 1:], y5[:, :-1])
    it = BatchSampler(toks, batch_size=4, seq_len=16, seed=3)
    batches = [next(it) for _ in range(6)]
    assert torch.equal(batches[5][0], x5)  # iterating reaches the same batch as asking for step 5
    resumed = BatchSampler(toks, batch_size=4, seq_len=16, seed=3)
    resumed.load_state_dict(it.state_dict())
    assert torch.equal(next(resumed)[0], one.batch(6)[0])
    halves = [BatchSampler(toks, 4, 16, seed=3, rank=r, world_size=2).batch(5)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), x5)
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        BatchSampler(toks, 3, 16, world_size=2)


# --- loop, checkpoints, resume -------------------------------------------------------------------------


def test_learning_rate_schedule():
    cfg = TrainConfig(model=TINY_MODEL, seq_len=32, steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert learning_rate(cfg, 0, 0.0) == pytest.approx(0.1)
    assert learning_rate(cfg, 9, 0.0) == pytest.approx(1.0)
    assert learning_rate(cfg, 10, 0.0) == pytest.approx(1.0)
    assert learning_rate(cfg, 55, 0.0) == pytest.approx(0.55)
    assert learning_rate(cfg, 100, 0.0) == pytest.approx(0.1)
    timed = TrainConfig(model=TINY_MODEL, seq_len=32, steps=10**9, warmup=0, lr=1.0, min_lr_ratio=0.0, max_seconds=60.0)
    assert learning_rate(timed, 5, 30.0) == pytest.approx(0.5)


def test_precision_is_bf16_or_fp32_and_fp32_turns_autocast_off():
    from mmm.train.loop import autocast

    with pytest.raises(ValueError, match="precision must be 'bf16' or 'fp32'"):
        TrainConfig(model=TINY_MODEL, seq_len=32, precision="fp16")
    # autocast state is checked without a GPU: the context manager must be a no-op for fp32 and on CPU
    assert not isinstance(autocast(torch.device("cuda"), "fp32"), torch.autocast)
    assert not isinstance(autocast(torch.device("cpu"), "bf16"), torch.autocast)
    assert isinstance(autocast(torch.device("cuda"), "bf16"), torch.autocast)


def test_killed_and_resumed_run_reproduces_the_uninterrupted_losses(tmp_path, text_dir):
    full = train(tiny(tmp_path / "full", text_dir))

    def kill_after_3(step, loss):
        if step == 3:
            raise StopTraining

    with pytest.raises(StopTraining):
        train(tiny(tmp_path / "part", text_dir, ckpt_every=3), on_step=kill_after_3)
    assert ckpt.read_meta(tmp_path / "part" / "checkpoint.safetensors")["step"] == 3
    resumed = train(tiny(tmp_path / "part", text_dir, resume="auto"))
    assert resumed["history"]["step"] == list(range(1, 7))
    np.testing.assert_allclose(resumed["history"]["loss"], full["history"]["loss"], rtol=0, atol=1e-6)
    np.testing.assert_allclose([v["loss"] for v in resumed["val"]], [v["loss"] for v in full["val"]], rtol=0, atol=1e-6)
    assert full["history"]["loss"][-1] < full["history"]["loss"][0]  # it does learn
    for name in ("log.json", "loss.png", "checkpoint.safetensors"):
        assert (tmp_path / "full" / name).is_file()


def test_checkpoint_is_safetensors_and_writes_are_atomic(tmp_path, text_dir, monkeypatch):
    train(tiny(tmp_path, text_dir, steps=2, val_every=0))
    path = tmp_path / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("model.") for k in keys) and any(k.endswith(".exp_avg_sq") for k in keys)
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):  # die half-way through writing the temp file
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        train(tiny(tmp_path, text_dir, steps=3, val_every=0))
    assert path.read_bytes() == before  # the previous checkpoint is untouched
    from mmm.models import GPT

    assert GPT.load(path).cfg == TINY_MODEL  # a training checkpoint loads as a model for generation


def test_resume_from_a_different_config_names_the_fields(tmp_path, text_dir):
    train(tiny(tmp_path, text_dir, steps=2, val_every=0))
    other = tiny(tmp_path, text_dir, steps=2, val_every=0, lr=3e-3, resume="auto",
                 model=GPTConfig(d_model=64, n_layers=2, n_heads=4, max_seq_len=32))
    with pytest.raises(ValueError, match="different configuration") as info:
        train(other)
    msg = str(info.value)
    assert "model.d_model: checkpoint 32, now 64" in msg and "lr: checkpoint 0.001, now 0.003" in msg
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny(tmp_path / "nothing", text_dir, resume="auto"))


def test_two_process_gloo_ddp_run_matches_one_process(tmp_path, text_dir):
    args = ["--d-model", "32", "--n-layers", "2", "--n-heads", "4", "--seq-len", "32", "--batch-size", "4",
            "--steps", "4", "--warmup", "2", "--val-every", "2", "--val-batches", "2", "--data", str(text_dir),
            "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "mmm", "train",
           *args, "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mmm.cli import main

    assert main(["train", *args, "--out", str(tmp_path / "one")]) == 0
    ddp, one = (json.loads((tmp_path / n / "log.json").read_text()) for n in ("ddp", "one"))
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    np.testing.assert_allclose(ddp["history"]["loss"], one["history"]["loss"], rtol=1e-5)
    np.testing.assert_allclose([v["loss"] for v in ddp["val"]], [v["loss"] for v in one["val"]], rtol=1e-5)


@pytest.mark.slow
def test_two_process_gloo_fsdp2_run_matches_one_process(tmp_path, text_dir):
    args = ["--d-model", "32", "--n-layers", "2", "--n-heads", "4", "--seq-len", "32", "--batch-size", "4",
            "--steps", "4", "--warmup", "2", "--val-every", "2", "--val-batches", "2", "--data", str(text_dir),
            "--device", "cpu", "--no-progress", "--ckpt-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "mmm", "train",
           *args, "--fsdp", "--out", str(tmp_path / "fsdp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = train(tiny(tmp_path / "one", text_dir, steps=4, val_every=2))
    fsdp = json.loads((tmp_path / "fsdp" / "log.json").read_text())
    np.testing.assert_allclose(fsdp["history"]["loss"], one["history"]["loss"], rtol=1e-5)
    # The FSDP checkpoint holds full (unsharded) tensors: a one-process run can resume from it.
    with safe_open(str(tmp_path / "fsdp" / "checkpoint.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.embed.weight").shape == (256, 32)


def test_more_gpus_than_exist_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"4 processes per node .* has 2 CUDA device\(s\)"):
        check_gpu_count(4, 2)
    check_gpu_count(2, 2)


# --- compare and CLI ----------------------------------------------------------------------------------


def test_compare_writes_plot_and_summary(tmp_path, text_dir):
    from mmm.cli import main

    rc = main(["train", "--compare", "dense,mmm", "--minutes", "0.01", "--ffn-structure", "lowrank:rank=4",
               "--attention", "linear", "--d-model", "32", "--n-layers", "2", "--n-heads", "4", "--seq-len", "32",
               "--batch-size", "4", "--steps", "8", "--warmup", "1", "--val-every", "2", "--val-batches", "1",
               "--data", str(text_dir), "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    assert (tmp_path / "compare.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "compare.json").read_text())
    dense, mmm_ = summary["models"]["dense"], summary["models"]["mmm"]
    assert dense["config"]["model"]["ffn_config"] == {"structure": "dense"}
    assert dense["config"]["model"]["attention"] == "exact"
    assert mmm_["config"]["model"]["ffn_config"] == {"structure": "lowrank", "rank": 4}
    assert mmm_["config"]["model"]["attention"] == "linear"
    assert mmm_["params"] < dense["params"]
    for m in (dense, mmm_):
        assert m["tokens_per_s"] > 0 and math.isfinite(m["final_val_loss"])
        times = [t for t, _ in m["val_curve"]]
        assert times == sorted(times) and len(times) >= 1


def test_parse_structure():
    assert parse_structure("dense").name == "dense"
    assert parse_structure("monarch:nblocks=4").nblocks == 4
    assert parse_structure("lowrank:rank=256").rank == 256
    assert parse_structure("kronecker:terms=2,in_factors=4x8").in_factors == (4, 8)
    with pytest.raises(ValueError, match="known structures: .*monarch"):
        parse_structure("monarc:nblocks=4")
    with pytest.raises(ValueError, match=r"key in \['rank'\]"):
        parse_structure("lowrank:rnk=4")


def test_cli_errors(tmp_path, capsys):
    from mmm.cli import main

    with pytest.raises(SystemExit, match="no such file or directory"):
        main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["train", "--ffn-structure", "nonsense"])
    assert "known structures" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="seq_len=64 is longer than the model's max_seq_len=32"):
        (tmp_path / "a.txt").write_text("print('hello')\n" * 100)
        main(["train", "--seq-len", "64", "--max-seq-len", "32", "--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--compare needs --minutes"):
        main(["train", "--compare", "dense,mmm"])


@pytest.mark.gpu
def test_gpu_training_bf16_compile_and_resume(tmp_path, text_dir):
    compiled = train(tiny(tmp_path / "compiled", text_dir, device="cuda", compile=True))
    assert all(math.isfinite(v) for v in compiled["history"]["loss"])

    def kill_after_3(step, loss):
        if step == 3:
            raise StopTraining

    with pytest.raises(StopTraining):
        train(tiny(tmp_path / "part", text_dir, device="cuda", ckpt_every=3), on_step=kill_after_3)
    resumed = train(tiny(tmp_path / "part", text_dir, device="cuda", resume="auto"))
    uninterrupted = train(tiny(tmp_path / "full", text_dir, device="cuda"))
    # bf16 autocast and possibly non-deterministic attention backward: close, not bitwise.
    np.testing.assert_allclose(resumed["history"]["loss"], uninterrupted["history"]["loss"], rtol=2e-3)
    np.testing.assert_allclose(compiled["history"]["loss"], uninterrupted["history"]["loss"], rtol=2e-2)
