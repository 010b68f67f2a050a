"""Pruning streamed from and to disk (offload="disk"), resuming a killed run, and whole-model
(global) sparsity over streamed blocks, on tiny random checkpoints written by the tests."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pyprune_fast import llm, masks
from tests.test_llm_models import tiny_causal_lm
from tests.test_llm_pipeline import BATCH, N_SAMPLES, SEQ_LEN, block_weights, calibration

pytest.importorskip("accelerate")
OPTIONS = {"num_samples": N_SAMPLES, "seq_len": SEQ_LEN, "batch_size": BATCH, "progress": False}


def checkpoint(tmp_path, arch="llama", shard="20KB", dtype=None):
    """A tiny random causal LM saved as a sharded safetensors checkpoint; returns (model, path)."""
    model = tiny_causal_lm(arch)
    if dtype is not None:
        model = model.to(dtype)
    path = tmp_path / f"{arch}-dense"
    model.save_pretrained(path, max_shard_size=shard)
    return model, path


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype="auto").eval()


def assert_same_model(got, want):
    a, b = got.state_dict(), want.state_dict()
    assert set(a) == set(b)
    for name in b:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(
    "arch,method,sparsity,extra",
    [
        ("llama", "magnitude", 0.5, {}),
        ("llama", "wanda", 0.5, {}),
        ("qwen2", "sparsegpt", "2:4", {}),
        ("opt", "wanda", 0.5, {"propagate": "dense"}),
        ("gpt_neox", "wanda", 0.4, {"owl": llm.OWL(M=2.0, lam=0.05)}),
        ("mistral", "snip", 0.5, {}),
    ],
)
def test_disk_streaming_equals_in_memory_pruning(tmp_path, arch, method, sparsity, extra):
    model, path = checkpoint(tmp_path, arch)
    expected = llm.prune(model, calibration(), method=method, sparsity=sparsity, **OPTIONS, **extra)
    out = tmp_path / "pruned"
    result = llm.prune(path, calibration(), method=method, sparsity=sparsity, offload="disk", out=out, **OPTIONS,
                       **extra)  # fmt: skip
    assert result.output == out and result.resumed_blocks == 0
    assert result.layer_sparsity == expected.layer_sparsity
    assert result.block_sparsity == expected.block_sparsity
    assert_same_model(load(out), model)

    def index(directory):
        return set(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"])

    assert index(out) == index(path)
    assert "peak host memory" in result.summary() and "written to" in result.summary()


def test_a_single_file_bfloat16_checkpoint_is_streamed_in_its_dtype(tmp_path):
    _, path = checkpoint(tmp_path, "llama", shard="10GB", dtype=torch.bfloat16)
    assert (path / "model.safetensors").is_file()
    model = load(path)  # as from_pretrained makes it (its rotary buffers stay float32)
    llm.prune(model, calibration(), method="wanda", **OPTIONS)
    llm.prune(path, calibration(), method="wanda", offload="disk", out=tmp_path / "out", **OPTIONS)
    got = load(tmp_path / "out")
    assert got.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert_same_model(got, model)


def test_the_skeleton_holds_no_block_weights_between_turns(tmp_path):
    from pyprune_fast.llm.offload import open_disk_model

    skeleton, store = open_disk_model(checkpoint(tmp_path)[1])
    assert all(p.is_meta for p in skeleton.parameters())
    block = store.blocks[1]
    with store.block(1, block):
        assert not any(p.is_meta for p in block.parameters())
        assert all(p.is_meta for p in store.blocks[0].parameters())
    assert all(p.is_meta for p in block.parameters())


# --- resume -----------------------------------------------------------------------------------------

CHILD = """
import sys, time, torch
from pyprune_fast import llm
from pyprune_fast.llm import offload
from tests.test_llm_pipeline import calibration, N_SAMPLES, SEQ_LEN, BATCH
write = offload.write_shard
def slow(path, tensors):
    write(path, tensors)
    time.sleep(0.5 if "-of-" in str(path) else 0)
offload.write_shard = slow
granularity = sys.argv[3] if len(sys.argv) > 3 else None
llm.prune(sys.argv[1], calibration(), method="wanda", sparsity=0.5, granularity=granularity, offload="disk",
          out=sys.argv[2], num_samples=N_SAMPLES, seq_len=SEQ_LEN, batch_size=BATCH, progress=False)
"""


def kill_after_blocks(path, out, blocks, *extra):
    """Runs a disk-streamed prune in a subprocess and SIGKILLs it once `blocks` block shards exist."""
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(out), *extra], env=env)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and child.poll() is None:
            shards = [f for f in out.glob("model-*.safetensors") if not f.name.startswith("model-00001-")]
            if len(shards) >= blocks:
                child.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL, "the run finished before it could be killed"


@pytest.mark.parametrize("granularity", [None, "global"])
def test_a_run_killed_mid_way_resumes_to_the_same_result(tmp_path, granularity):
    model, path = checkpoint(tmp_path, "llama")
    model.config.num_hidden_layers  # noqa: B018
    out = tmp_path / "pruned"
    kill_after_blocks(path, out, 1, *([granularity] if granularity else []))
    assert not (out / "model.safetensors.index.json").exists()
    with pytest.raises(FileExistsError, match="resume"):
        llm.prune(path, calibration(), method="wanda", granularity=granularity, offload="disk", out=out, **OPTIONS)
    result = llm.prune(path, calibration(), method="wanda", granularity=granularity, offload="disk", out=out,
                       resume=True, **OPTIONS)  # fmt: skip
    assert result.resumed_blocks >= 1
    llm.prune(model, calibration(), method="wanda", granularity=granularity, **OPTIONS)
    assert_same_model(load(out), model)


def test_a_half_written_block_shard_is_not_taken_for_finished(tmp_path):
    model, path = checkpoint(tmp_path, "llama")
    out = tmp_path / "pruned"
    llm.prune(path, calibration(), offload="disk", out=out, **OPTIONS)
    (out / "model.safetensors.index.json").unlink()
    last = sorted(out.glob("model-*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-7])  # truncated, as by a crash of a non-atomic writer
    result = llm.prune(path, calibration(), offload="disk", out=out, resume=True, **OPTIONS)
    _, blocks = llm.find_blocks(model)
    assert result.resumed_blocks == len(blocks) - 1
    llm.prune(model, calibration(), **OPTIONS)
    assert_same_model(load(out), model)


def test_resume_refuses_other_options_or_another_input(tmp_path):
    _, path = checkpoint(tmp_path, "llama")
    out = tmp_path / "pruned"
    llm.prune(path, calibration(), offload="disk", out=out, **OPTIONS)
    with pytest.raises(ValueError, match="sparsity='50%' \\(now '60%'\\)"):
        llm.prune(path, calibration(), sparsity=0.6, offload="disk", out=out, resume=True, **OPTIONS)
    with pytest.raises(ValueError, match="calibration"):
        llm.prune(path, calibration(seed=2), offload="disk", out=out, resume=True, **OPTIONS)
    (path / "config.json").touch()
    other = tmp_path / "copy"
    other.mkdir()
    for f in path.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="input checkpoint"):
        llm.prune(other, calibration(), offload="disk", out=out, resume=True, **OPTIONS)


# --- bad input --------------------------------------------------------------------------------------


def test_corrupt_or_missing_shards_are_named(tmp_path):
    _, path = checkpoint(tmp_path, "llama")
    shards = sorted(path.glob("model-*.safetensors"))
    shards[2].write_bytes(shards[2].read_bytes()[:100])
    with pytest.raises(ValueError, match=f"shard .*{shards[2].name} is not a readable safetensors file"):
        llm.prune(path, offload="disk", out=tmp_path / "a", method="magnitude", progress=False)
    shards[2].unlink()
    with pytest.raises(ValueError, match=f"shard .*{shards[2].name} named by model.safetensors.index.json is missing"):
        llm.prune(path, offload="disk", out=tmp_path / "a", method="magnitude", progress=False)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"out": None}, ValueError, "out="),
        ({"offload": "ram"}, ValueError, "offload must be one of"),
        ({"resume": "yes"}, TypeError, "resume must be a bool"),
        ({"granularity": "global", "method": "sparsegpt"}, ValueError, "sparsegpt chooses its masks"),
    ],
)
def test_bad_offload_options(tmp_path, kwargs, error, match):
    _, path = checkpoint(tmp_path, "llama")
    options = {"offload": "disk", "out": tmp_path / "out", "method": "magnitude", **kwargs}
    with pytest.raises(error, match=match):
        llm.prune(path, calibration(), **options, **OPTIONS)


def test_an_in_memory_model_or_a_non_empty_output_is_refused(tmp_path):
    model, path = checkpoint(tmp_path, "llama")
    with pytest.raises(TypeError, match="path of a safetensors checkpoint"):
        llm.prune(model, offload="disk", out=tmp_path / "out", method="magnitude")
    with pytest.raises(ValueError, match="out= and resume= belong to offload='disk'"):
        llm.prune(model, out=tmp_path / "out", method="magnitude")
    with pytest.raises(ValueError, match="out must differ"):
        llm.prune(path, offload="disk", out=path, method="magnitude")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no pyprune_fast run"):
        llm.prune(path, offload="disk", out=tmp_path / "mine", method="magnitude")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# --- whole-model sparsity ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["magnitude", "wanda", "feature_l1"])
def test_global_sparsity_is_masks_global_unstructured_over_the_scores(method):
    model = tiny_causal_lm("llama")
    if method == "magnitude":  # many ties across blocks: the tie rule must match too
        with torch.no_grad():
            for w in block_weights(model).values():
                w.copy_(torch.round(w * 20) / 20)
    dense = {n: w.detach().clone() for n, w in block_weights(model).items()}
    scores = llm.scores(model, calibration(), method=method, **OPTIONS)
    assert list(scores) == list(dense)
    want = masks.global_unstructured(scores, 0.6)
    assert sum(int((~keep).sum()) for keep in want.values()) == round(0.6 * sum(w.numel() for w in dense.values()))
    result = llm.prune(model, calibration(), method=method, sparsity=0.6, granularity="global", **OPTIONS)
    got = block_weights(model)
    for name, keep in want.items():
        assert torch.equal(got[name], dense[name] * keep), name
    assert len(set(result.block_sparsity)) > 1 and result.granularity == "global"


def test_global_sparsity_streamed_from_disk_equals_in_memory(tmp_path):
    model, path = checkpoint(tmp_path, "qwen2")
    llm.prune(model, calibration(), method="wanda", sparsity=0.7, granularity="global", **OPTIONS)
    out = tmp_path / "out"
    llm.prune(path, calibration(), method="wanda", sparsity=0.7, granularity="global", offload="disk", out=out,
              keep_scores=True, **OPTIONS)  # fmt: skip
    assert_same_model(load(out), model)
    assert len(list((out / "pyprune_scores").glob("block-*.f32"))) == llm.find_blocks(model)[1].__len__()


def test_a_finished_global_run_removes_its_score_files_unless_asked(tmp_path):
    _, path = checkpoint(tmp_path, "llama")
    out = tmp_path / "out"
    llm.prune(path, calibration(), method="wanda", sparsity=0.5, granularity="global", offload="disk", out=out,
              **OPTIONS)  # fmt: skip
    assert not (out / "pyprune_scores").exists() and (out / "model.safetensors.index.json").is_file()
    with pytest.raises(ValueError, match="keep_scores=True keeps the score files of a granularity='global'"):
        llm.prune(path, calibration(), method="wanda", offload="disk", out=tmp_path / "o2", keep_scores=True,
                  **OPTIONS)  # fmt: skip


def test_global_sparsity_refuses_nan_scores_naming_the_block():
    model = tiny_causal_lm("llama")
    _, blocks = llm.find_blocks(model)
    with torch.no_grad():
        blocks[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="decoder block 1"):
        llm.prune(model, method="magnitude", sparsity=0.5, granularity="global", progress=False)


def test_perplexity_streamed_one_block_at_a_time_equals_the_loaded_model(tmp_path):
    from pyprune_fast.llm.offload import open_disk_model

    _, path = checkpoint(tmp_path, "mistral")
    tokens = calibration(seed=3)
    want = llm.perplexity(load(path), tokens, seq_len=SEQ_LEN, batch_size=2, progress=False)
    skeleton, store = open_disk_model(path)
    with store.streamed() as model:
        assert model is skeleton
        got = llm.perplexity(model, tokens, seq_len=SEQ_LEN, batch_size=2, progress=False)
    assert got == want
    assert all(p.is_meta for p in skeleton.parameters())  # everything freed again


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox", "opt"])  # opt: the head tied to the embeddings
@pytest.mark.parametrize("batch_size,stride", [(2, None), (3, SEQ_LEN // 2)])  # 3: a padded last window
def test_perplexity_offload_disk_reads_each_block_once_and_equals_the_loaded_model(
    tmp_path, monkeypatch, arch, batch_size, stride
):
    from pyprune_fast.llm.offload import DiskStore

    _, path = checkpoint(tmp_path, arch)
    tokens = calibration(seed=3)[:-3]
    options = {"seq_len": SEQ_LEN, "batch_size": batch_size, "stride": stride, "progress": False}
    want = llm.perplexity(load(path), tokens, **options)
    loads, outside = [], []
    load_block, load_outside = DiskStore._load, DiskStore._outside
    monkeypatch.setattr(DiskStore, "_load", lambda self, i, *a: loads.append(i) or load_block(self, i, *a))
    monkeypatch.setattr(DiskStore, "_outside", lambda self, skip: outside.append(skip) or load_outside(self, skip))
    got = llm.perplexity(path, tokens, **options, offload="disk")
    assert got == want
    assert loads == [0, 1]  # each block read once for all windows
    tied = arch == "opt"
    head = {"lm_head.weight"}
    embeddings = {"gpt_neox.embed_in.weight" if arch == "gpt_neox" else "model.embed_tokens.weight"}
    assert outside == ([set(), set()] if tied else [head, embeddings])  # never the head and the embeddings at once


def test_perplexity_offload_disk_needs_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="offload must be None or 'disk'"):
        llm.perplexity(str(tmp_path), calibration(), seq_len=SEQ_LEN, offload="memory")
    with pytest.raises(TypeError, match="checkpoint directory with offload='disk'"):
        llm.perplexity(str(tmp_path), calibration(), seq_len=SEQ_LEN)
    with pytest.raises(ValueError, match="is not a directory"):
        llm.perplexity(str(tmp_path / "absent"), calibration(), seq_len=SEQ_LEN, offload="disk")


def test_a_shard_copied_tensor_by_tensor_equals_one_written_at_once(tmp_path):
    from pyprune_fast.llm.checkpoint import Checkpoint, read_shard, write_shard

    _, path = checkpoint(tmp_path, "llama", dtype=torch.bfloat16)
    source = Checkpoint(path)
    names = source.keys()[::3]
    write_shard(tmp_path / "at-once.safetensors", source.get_many(names))
    source.copy_shard(names, tmp_path / "copied.safetensors")
    assert (tmp_path / "copied.safetensors").read_bytes() == (tmp_path / "at-once.safetensors").read_bytes()
    got = read_shard(tmp_path / "copied.safetensors", names)
    assert all(torch.equal(got[n], t) for n, t in source.get_many(names).items())
