"""The LLM path against hostile or unlucky use: tampered files of an --offload disk run, a changed
input on resume, shard names leaving the checkpoint directory, flipped bytes in written shards, a full
disk, arguments that used to end in a traceback. Each error names the file or argument and what was
expected, before anything is touched."""

import errno
import hashlib
import json
import math
import os

import pytest
import torch

from pyprune_fast import llm
from pyprune_fast.llm import checkpoint as ckpt
from pyprune_fast.llm.checkpoint import INDEX, Checkpoint
from tests.test_llm_offload import OPTIONS, assert_same_model, checkpoint, load
from tests.test_llm_pipeline import calibration

pytest.importorskip("accelerate")
RUN_FILE = "pyprune_run.json"


def disk_run(path, out, **extra):
    return llm.prune(path, calibration(), offload="disk", out=out, **OPTIONS, **extra)


# --- resume: the input and the run's own files --------------------------------------------------------


@pytest.mark.parametrize("file,key,value", [("config.json", "rms_norm_eps", 1e-3),
                                             ("generation_config.json", "max_length", 7)])  # fmt: skip
def test_resume_refuses_a_changed_model_definition_naming_the_file(tmp_path, file, key, value):
    _, path = checkpoint(tmp_path, "llama")
    out = tmp_path / "out"
    disk_run(path, out)
    assert (path / file).is_file()
    defined = json.loads((path / file).read_text())
    (path / file).write_text(json.dumps({**defined, key: value}))
    with pytest.raises(ValueError, match=f"cannot resume .*{file}"):
        disk_run(path, out, resume=True)


def test_resume_refuses_a_changed_index_naming_it(tmp_path):
    _, path = checkpoint(tmp_path, "llama")
    out = tmp_path / "out"
    disk_run(path, out)
    index = json.loads((path / INDEX).read_text())
    (path / INDEX).write_text(json.dumps(index))  # the same map, other bytes: not what the run read
    with pytest.raises(ValueError, match=f"cannot resume .*{INDEX}"):
        disk_run(path, out, resume=True)


@pytest.mark.parametrize(
    "text",
    ["{}", "[]", "null", "7", "not json", '{"options": [], "source": 1, "input": {}}',
     '{"options": {}, "source": "x"}', '{"options": {}, "source": "x", "input": [], "kept": 3}'],
)  # fmt: skip
def test_a_tampered_run_record_is_refused_naming_it(tmp_path, text):
    _, path = checkpoint(tmp_path, "llama")
    out = tmp_path / "out"
    disk_run(path, out)
    (out / RUN_FILE).write_text(text)
    with pytest.raises(ValueError, match=f"{RUN_FILE}.*expected a JSON object"):
        disk_run(path, out, resume=True)


OWL_RUN = {"method": "wanda", "sparsity": 0.4, "owl": llm.OWL(M=2.0, lam=0.05)}


def test_a_tampered_owl_file_is_refused_naming_it(tmp_path):
    _, path = checkpoint(tmp_path, "gpt_neox")
    out = tmp_path / "out"
    disk_run(path, out, **OWL_RUN)
    owl = out / "pyprune_owl.json"
    ratios, fractions = json.loads(owl.read_text())
    blocks = len(fractions)
    for tampered in ([ratios, [0.9] * blocks], [ratios, fractions[:-1]], [ratios, ["a"] * blocks],
                     [ratios, [math.nan] * blocks], {}, None):  # fmt: skip
        owl.write_text(json.dumps(tampered))
        with pytest.raises(ValueError, match="pyprune_owl.json was changed after the run wrote it"):
            disk_run(path, out, resume=True, **OWL_RUN)
    owl.write_text("{not json")
    with pytest.raises(ValueError, match="pyprune_owl.json was changed after the run wrote it"):
        disk_run(path, out, resume=True, **OWL_RUN)
    # the record tampered to match: the value itself is still checked
    for tampered in ([ratios, [1.5] * blocks], [ratios, fractions[:-1]], [ratios, [math.nan] * blocks], {}):
        text = json.dumps(tampered) + "\n"
        owl.write_text(text)
        record = json.loads((out / RUN_FILE).read_text())
        record["kept"]["owl"] = hashlib.sha256(text.encode()).hexdigest()
        (out / RUN_FILE).write_text(json.dumps(record))
        with pytest.raises(ValueError, match=f"pyprune_owl.json: expected .*one finite number in \\[0, 1\\] per "
                                             f"decoder block \\({blocks}\\)"):  # fmt: skip
            disk_run(path, out, resume=True, **OWL_RUN)


def test_an_owl_file_kept_untouched_is_reused(tmp_path):
    _, path = checkpoint(tmp_path, "gpt_neox")
    out = tmp_path / "out"
    first = disk_run(path, out, **OWL_RUN)
    again = disk_run(path, out, resume=True, **OWL_RUN)
    assert again.block_sparsity == first.block_sparsity and again.outlier_ratio == first.outlier_ratio


# --- shard names leaving the checkpoint directory ------------------------------------------------------


def _redirect_first_shard(path, target: str) -> None:
    index = json.loads((path / INDEX).read_text())
    first = next(iter(index["weight_map"].values()))
    index["weight_map"] = {k: target if v == first else v for k, v in index["weight_map"].items()}
    (path / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_shards_outside_the_checkpoint_directory_are_refused(tmp_path, how):
    _, path = checkpoint(tmp_path, "llama")
    other = tmp_path / "other"
    other.mkdir()
    first = next(iter(json.loads((path / INDEX).read_text())["weight_map"].values()))
    (other / "x.safetensors").write_bytes((path / first).read_bytes())
    if how == "dotdot":
        target = "../other/x.safetensors"
    elif how == "absolute":
        target = str(other / "x.safetensors")
    else:
        target = "link.safetensors"
        os.symlink(other / "x.safetensors", path / target)
    _redirect_first_shard(path, target)
    with pytest.raises(ValueError, match=f"{INDEX}: shard '{target}' leaves the checkpoint directory"):
        Checkpoint(path)


def test_a_hugging_face_hub_snapshot_is_read_through_its_blob_links(tmp_path):
    model, path = checkpoint(tmp_path, "llama")
    repo = tmp_path / "hub" / "models--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(path.iterdir())):
        (repo / "blobs" / f"blob{i}").write_bytes(f.read_bytes())
        os.symlink(f"../../blobs/blob{i}", snapshot / f.name)
    got = Checkpoint(snapshot)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(got.get_many([name])[name], model.state_dict()[name])


# --- what we write: a full disk, flipped bytes ----------------------------------------------------------


def test_a_full_disk_while_writing_a_shard_names_the_file(tmp_path, monkeypatch):
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "open", lambda p, mode="r": Full(real_open(p, mode)), raising=False)
    target = tmp_path / "model-00001-of-00002.safetensors"
    with pytest.raises(OSError, match=f"shard .*{target.name}") as caught:
        ckpt.write_shard(target, {"a": torch.ones(3)})
    assert caught.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # neither the shard nor its temporary


def test_a_full_disk_while_copying_side_files_or_the_index_names_the_file(tmp_path, monkeypatch):
    _, path = checkpoint(tmp_path, "llama")
    out = tmp_path / "out"
    out.mkdir()

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.shutil, "copyfile", full)
    with pytest.raises(OSError, match="side file .*config.json"):
        ckpt.copy_side_files(path, out)
    monkeypatch.setattr(ckpt, "write_text", full)
    with pytest.raises(OSError, match=f"the index .*{INDEX}") as caught:
        ckpt.write_index(out, {"a": "model.safetensors"}, 4)
    assert caught.value.errno == errno.ENOSPC


def _flip_a_data_byte(shard) -> None:
    raw = bytearray(shard.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    raw[8 + header + 5] ^= 0x10
    shard.write_bytes(bytes(raw))


def test_flipped_bytes_in_a_finished_shard_are_not_taken_on_resume(tmp_path):
    model, path = checkpoint(tmp_path, "llama")
    out = tmp_path / "out"
    disk_run(path, out)
    (out / INDEX).unlink()
    _flip_a_data_byte(sorted(out.glob("model-*.safetensors"))[1])  # decoder block 0
    result = disk_run(path, out, resume=True)
    assert result.resumed_blocks == 0
    llm.prune(model, calibration(), **OPTIONS)
    assert_same_model(load(out), model)


def test_flipped_bytes_in_a_shard_we_wrote_are_refused_when_read(tmp_path):
    _, path = checkpoint(tmp_path, "llama")
    out = tmp_path / "out"
    disk_run(path, out)
    shard = sorted(out.glob("model-*.safetensors"))[2]
    _flip_a_data_byte(shard)
    read = Checkpoint(out)
    names = [n for n, s in read.weight_map.items() if s == shard.name]
    with pytest.raises(ValueError, match=f"shard .*{shard.name}.*sha256"):
        read.get_many(names)


# --- arguments that used to end in a traceback ----------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_perplexity_refuses_what_the_model_cannot_take(arch):
    from tests.test_llm_models import VOCAB, tiny_causal_lm

    model = tiny_causal_lm(arch)
    ids = calibration()
    with pytest.raises(ValueError, match="seq_len must be an int >= 2.*got 1"):
        llm.perplexity(model, ids, seq_len=1, progress=False)
    long = torch.arange(100) % VOCAB
    with pytest.raises(ValueError, match="seq_len=65 .*max_position_embeddings \\(64\\)"):
        llm.perplexity(model, long, seq_len=65, progress=False)
    assert llm.perplexity(model, long, seq_len=64, progress=False) > 0
    assert llm.perplexity(model, long[:50], seq_len=2048, progress=False) > 0  # windows of 50 tokens fit
    bad = ids.clone()
    bad[3] = VOCAB + 4
    with pytest.raises(ValueError, match=f"token id {VOCAB + 4},.*vocabulary of {VOCAB}"):
        llm.perplexity(model, bad, seq_len=8, progress=False)
    bad[3] = -1
    with pytest.raises(ValueError, match="token id -1"):
        llm.perplexity(model, bad, seq_len=8, progress=False)


@pytest.mark.parametrize("percdamp", [math.inf, math.nan, -0.1])
def test_inverse_factor_refuses_a_non_finite_percdamp(percdamp):
    from pyprune_fast.llm.sparsegpt import inverse_factor

    x = torch.randn(40, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="percdamp must be a finite number >= 0"):
        inverse_factor(x.T @ x, percdamp)


def test_sparsegpt_with_an_infinite_percdamp_is_refused_with_the_model_unchanged():
    from tests.test_llm_models import tiny_causal_lm

    model = tiny_causal_lm("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="percdamp must be a finite number >= 0, got inf"):
        llm.prune(model, calibration(), method="sparsegpt", percdamp=math.inf, **OPTIONS)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
