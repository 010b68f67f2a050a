"""Mask files: round trips, metadata, the bit layout, atomic writes and mismatch errors."""

import json
import os
import signal
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

import pyprune_fast
from pyprune_fast import io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_masks(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (5, 3), "b.weight": (4, 3, 2, 2), "c.bias": (7,), "empty": (0, 4), "scalar": ()}
    return {n: torch.rand(s, generator=g) > 0.5 for n, s in shapes.items()}


def temporaries(directory) -> list[str]:
    return [f for f in os.listdir(directory) if f.endswith(".tmp")]


@pytest.mark.parametrize("packed", [True, False])
def test_round_trip_and_metadata(tmp_path, packed):
    masks = random_masks()
    path = tmp_path / "m.safetensors"
    pyprune_fast.save_masks(path, masks, {"criterion": "snip", "sparsity": 0.9, "metrics": {"acc": 0.5}}, packed=packed)
    loaded = pyprune_fast.load_masks(path)
    assert list(loaded) == list(masks)
    for name, mask in masks.items():
        assert loaded[name].dtype == torch.bool
        assert loaded[name].shape == mask.shape
        assert torch.equal(loaded[name], mask)
    meta = pyprune_fast.mask_metadata(path)
    assert meta["criterion"] == "snip"
    assert json.loads(meta["sparsity"]) == 0.9
    assert json.loads(meta["metrics"]) == {"acc": 0.5}
    assert meta["pyprune_fast_version"] == pyprune_fast.__version__
    assert meta["packing"] == ("bits-lsb" if packed else "bool")
    assert json.loads(meta["shapes"])["b.weight"] == [4, 3, 2, 2]
    assert temporaries(tmp_path) == []


def test_bit_layout_is_lsb_first(tmp_path):
    """Entry i of the flattened mask is bit i % 8 of byte i // 8; the last byte is zero-padded."""
    mask = torch.tensor([[True, False, False, True, False], [False, False, False, False, True]])
    path = tmp_path / "m.safetensors"
    pyprune_fast.save_masks(path, {"w": mask})
    with safe_open(str(path), framework="pt") as f:
        stored = f.get_tensor("w")
    assert stored.dtype == torch.uint8
    # flat: 1 0 0 1 0 0 0 0 | 0 1 -> byte 0 = 0b00001001, byte 1 = 0b00000010
    assert stored.tolist() == [0b00001001, 0b00000010]


def test_packed_is_an_eighth_of_bool(tmp_path):
    masks = {"w": torch.rand(256, 1024, generator=torch.Generator().manual_seed(0)) > 0.3}
    pyprune_fast.save_masks(tmp_path / "p.safetensors", masks)
    pyprune_fast.save_masks(tmp_path / "b.safetensors", masks, packed=False)
    packed, plain = (os.path.getsize(tmp_path / f) for f in ("p.safetensors", "b.safetensors"))
    assert packed < plain / 7


def test_save_rejects_bad_input(tmp_path):
    path = tmp_path / "m.safetensors"
    with pytest.raises(TypeError, match=r"masks\['w'\] must be a bool tensor"):
        pyprune_fast.save_masks(path, {"w": torch.ones(3)})
    with pytest.raises(TypeError, match="masks must be a dict"):
        pyprune_fast.save_masks(path, [torch.ones(3, dtype=torch.bool)])
    with pytest.raises(ValueError, match="'format' is reserved"):
        pyprune_fast.save_masks(path, {"w": torch.ones(3, dtype=torch.bool)}, {"format": "x"})
    with pytest.raises(TypeError, match="metadata keys must be str"):
        pyprune_fast.save_masks(path, {"w": torch.ones(3, dtype=torch.bool)}, {1: "x"})
    assert not path.exists() and temporaries(tmp_path) == []


def test_interrupted_save_leaves_the_old_file(tmp_path, monkeypatch):
    """The write dies half-way (after part of the bytes reached the temporary): the old file is intact,
    no temporary is left, and the error reaches the caller."""
    path = tmp_path / "m.safetensors"
    old = random_masks(0)
    pyprune_fast.save_masks(path, old, {"criterion": "old"})
    before = path.read_bytes()

    def dies_half_way(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        pyprune_fast.save_masks(path, random_masks(1), {"criterion": "new"})
    assert path.read_bytes() == before
    assert temporaries(tmp_path) == []
    monkeypatch.undo()
    assert pyprune_fast.mask_metadata(path)["criterion"] == "old"
    assert all(torch.equal(pyprune_fast.load_masks(path)[n], m) for n, m in old.items())


def test_failed_rename_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    pyprune_fast.save_masks(path, random_masks(0))
    before = path.read_bytes()

    def fails(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fails)
    with pytest.raises(OSError, match="No space"):
        pyprune_fast.save_masks(path, random_masks(1))
    assert path.read_bytes() == before and temporaries(tmp_path) == []


def test_staged_files_replace_nothing_until_commit(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old a")
    with pytest.raises(RuntimeError), io.Staged() as staged:
        with open(staged.path(a), "w") as f:
            f.write("new a")
        with open(staged.path(b), "w") as f:
            f.write("new b")
        raise RuntimeError("a later step fails")
    assert a.read_text() == "old a" and not b.exists() and temporaries(tmp_path) == []
    with io.Staged() as staged:
        for path, text in ((a, "new a"), (b, "new b")):
            with open(staged.path(path), "w") as f:
                f.write(text)
        assert staged.commit() == [str(a), str(b)]
    assert a.read_text() == "new a" and b.read_text() == "new b" and temporaries(tmp_path) == []


def test_new_files_get_the_umask_mode_and_replaced_files_keep_theirs(tmp_path):
    path = tmp_path / "m.safetensors"
    umask = os.umask(0o022)
    try:
        pyprune_fast.save_masks(path, random_masks())
        assert path.stat().st_mode & 0o777 == 0o644
        path.chmod(0o600)
        pyprune_fast.save_masks(path, random_masks())
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(umask)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)


def test_load_against_a_model(tmp_path):
    model = Net()
    good = {"fc1.weight": torch.ones(8, 4, dtype=torch.bool), "fc2.weight": torch.zeros(2, 8, dtype=torch.bool)}
    path = tmp_path / "good.safetensors"
    pyprune_fast.save_masks(path, good)
    loaded = pyprune_fast.load_masks(path, model)
    pyprune_fast.apply_masks(model, loaded)
    assert model.fc2.weight.abs().sum() == 0 and model.fc1.weight.abs().sum() > 0


def test_load_names_every_mismatch(tmp_path):
    bad = {
        "fc1.weight": torch.ones(4, 8, dtype=torch.bool),
        "fc2.weight": torch.ones(2, 8, dtype=torch.bool),
        "fc3.weight": torch.ones(1, dtype=torch.bool),
        "encoder.fc1.weight": torch.ones(8, 4, dtype=torch.bool),
    }
    path = tmp_path / "bad.safetensors"
    pyprune_fast.save_masks(path, bad)
    with pytest.raises(ValueError) as info:
        pyprune_fast.load_masks(path, Net())
    message = str(info.value)
    assert "names the model does not have: ['fc3.weight', 'encoder.fc1.weight']" in message
    assert "fc1.weight: mask (4, 8) vs parameter (8, 4)" in message
    assert "fc2" not in message  # the mask that matches is not reported


def test_load_rejects_files_that_are_not_mask_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="mask file not found"):
        pyprune_fast.load_masks(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        pyprune_fast.load_masks(junk)
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, str(plain))
    with pytest.raises(ValueError, match="not a pyprune_fast mask file"):
        pyprune_fast.load_masks(plain)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        good = tmp_path / "good.safetensors"
        pyprune_fast.save_masks(good, {"w": torch.ones(2, dtype=torch.bool)})
        pyprune_fast.load_masks(good, model="resnet")


def test_load_rejects_a_packed_mask_of_the_wrong_length(tmp_path):
    path = tmp_path / "m.safetensors"
    pyprune_fast.save_masks(path, {"w": torch.ones(3, 5, dtype=torch.bool)})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    meta["shapes"] = json.dumps({"w": [3, 9]})
    safetensors.torch.save_file({"w": torch.zeros(2, dtype=torch.uint8)}, str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"does not fit shape \(3, 9\)"):
        pyprune_fast.load_masks(path)


def test_staged_directories_replace_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with io.Staged() as staged:
        temp = staged.directory(target)
        with open(os.path.join(temp, "new.txt"), "w") as f:
            f.write("new")
    # left without commit: the old directory is untouched and no temporary remains
    assert sorted(os.listdir(tmp_path)) == ["model"] and os.listdir(target) == ["old.txt"]
    with io.Staged() as staged:
        temp = staged.directory(target)
        with open(os.path.join(temp, "new.txt"), "w") as f:
            f.write("new")
        assert staged.commit() == [str(target)]
    assert sorted(os.listdir(tmp_path)) == ["model"] and os.listdir(target) == ["new.txt"]
    assert (target / "new.txt").read_text() == "new"


@pytest.mark.parametrize(
    "shapes, message",
    [
        ("{not json", r"its 'shapes' metadata is not JSON"),
        ('["w"]', r"its 'shapes' metadata must map names to shapes, got list"),
        ('{"w": 15}', r"the shape recorded for 'w' must be a list of non-negative ints, got 15"),
        ('{"w": [3, "5"]}', r"the shape recorded for 'w' must be a list of non-negative ints"),
        ('{"w": [3, -5]}', r"the shape recorded for 'w' must be a list of non-negative ints"),
        ('{"w": [3, true]}', r"the shape recorded for 'w' must be a list of non-negative ints"),
    ],
)
def test_corrupt_shapes_metadata_names_the_file(tmp_path, shapes, message):
    path = tmp_path / "m.safetensors"
    pyprune_fast.save_masks(path, {"w": torch.ones(3, 5, dtype=torch.bool)})
    with safe_open(str(path), framework="pt") as f:
        meta, packed = f.metadata(), f.get_tensor("w")
    meta["shapes"] = shapes
    safetensors.torch.save_file({"w": packed}, str(path), metadata=meta)
    with pytest.raises(ValueError, match=rf"^{path}: corrupt mask file: {message}"):
        pyprune_fast.load_masks(path)


def test_loading_a_directory_says_it_is_one(tmp_path):
    with pytest.raises(IsADirectoryError, match=rf"^{tmp_path} is a directory, not a mask file"):
        pyprune_fast.load_masks(tmp_path)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        pyprune_fast.mask_metadata(tmp_path)


# A child process that starts writing a mask file and stops half-way (part of the bytes in its
# temporary), says so, and waits to be killed.
HALF_WRITTEN_SAVE = """
import sys, time
import safetensors.torch, torch
import pyprune_fast

def stops_half_way(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"partial")
    print("writing", flush=True)
    time.sleep(120)

safetensors.torch.save_file = stops_half_way
pyprune_fast.save_masks(sys.argv[1], {"w": torch.zeros(4, dtype=torch.bool)})
"""


def killed_mid_save(path, signum) -> int:
    child = subprocess.Popen(
        [sys.executable, "-c", HALF_WRITTEN_SAVE, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert child.stdout.readline() == "writing\n"
        child.send_signal(signum)
        return child.wait(timeout=60)
    finally:
        child.kill()
        child.wait()


def test_sigterm_mid_save_removes_the_temporary_and_keeps_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    pyprune_fast.save_masks(path, random_masks(0))
    before = path.read_bytes()
    assert killed_mid_save(path, signal.SIGTERM) == -signal.SIGTERM  # still ends by SIGTERM
    assert temporaries(tmp_path) == [] and path.read_bytes() == before


def test_a_temporary_left_by_sigkill_is_removed_by_the_next_save(tmp_path):
    path = tmp_path / "m.safetensors"
    pyprune_fast.save_masks(path, random_masks(0))
    before = path.read_bytes()
    assert killed_mid_save(path, signal.SIGKILL) == -signal.SIGKILL
    stale = temporaries(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(".m.safetensors.") and path.read_bytes() == before
    # left alone: another file's temporary, a temporary of a live process, a file not named like ours
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        try:
            others = [
                f".other.safetensors.{stale[0].split('.')[3]}.abc123.tmp",
                f".m.safetensors.{live.pid}.abc123.tmp",
                ".m.safetensors.abc123.tmp",
                "m.safetensors.tmp",
            ]
            for name in others:
                (tmp_path / name).write_bytes(b"x")
            pyprune_fast.save_masks(path, random_masks(1))
            assert sorted(temporaries(tmp_path)) == sorted(others)
        finally:
            live.kill()
    assert all(torch.equal(pyprune_fast.load_masks(path)[n], m) for n, m in random_masks(1).items())
    assert io.remove_stale_temps(path) == [str(tmp_path / f".m.safetensors.{live.pid}.abc123.tmp")]


def test_staging_directories_of_dead_writers_are_removed_by_the_next_one(tmp_path):
    """A process killed while staging a directory (a prune's --out, a saved model) leaves
    .<name>.<pid>.<random>.partial; the next staging of the same name removes it, if its process is gone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".out.{dead_pid}.abc_12.partial"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "masks.safetensors").write_bytes(b"x")
    kept = [tmp_path / f".out.{os.getpid()}.abc.partial", tmp_path / f".other.{dead_pid}.abc.partial"]
    for directory in kept:
        directory.mkdir()
    staging = io.new_temp_dir(tmp_path / "out")
    assert os.path.basename(staging).startswith(f".out.{os.getpid()}.") and staging.endswith(".partial")
    assert not stale.exists() and all(d.exists() for d in kept)


def test_load_masks_refuses_recorded_shapes_the_file_cannot_hold(tmp_path):
    """A crafted 'shapes' metadata (dims beyond int64, a tensor of the wrong size or dtype in the file)
    is a ValueError naming the file and the mask, checked against the file's header before anything
    is read or unpacked."""
    import struct

    path = tmp_path / "m.safetensors"
    io.save_masks(path, {"a": torch.ones(3, dtype=torch.bool)})
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + size])

    def crafted(shapes, **tensor):
        h = json.loads(json.dumps(header))
        h["__metadata__"]["shapes"] = json.dumps(shapes)
        h["a"].update(tensor)
        data = b"\xff" * (h["a"]["data_offsets"][1] - h["a"]["data_offsets"][0])
        encoded = json.dumps(h).encode()
        encoded += b" " * (-len(encoded) % 8)
        bad = tmp_path / "crafted.safetensors"
        bad.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
        return bad

    for shapes, tensor in [
        ({"a": [0, 2**63]}, {"shape": [0], "data_offsets": [0, 0]}),
        ({"a": [0, 2**62, 2**62]}, {"shape": [0], "data_offsets": [0, 0]}),
        ({"a": [2**40]}, {}),
        ({"a": [3]}, {"dtype": "BOOL"}),
    ]:
        with pytest.raises(ValueError, match="crafted.safetensors: .*'a'"):
            io.load_masks(crafted(shapes, **tensor))
