"""Hugging Face safetensors checkpoints read tensor by tensor and written shard by shard, for pruning
models that do not fit in memory (`llm.prune(..., offload="disk")`, llm.offload).

Reading: the directory's `model.safetensors.index.json` (or its one `model.safetensors`) maps every
tensor to a shard; a tensor is read (plain reads, no memory map) only when asked for, so nothing but
the tensors in use is ever in RAM. Every shard is checked when the checkpoint is
opened: a missing, truncated or corrupt shard, an index naming tensors a shard does not hold, or a
shard name leaving the checkpoint directory, is a ValueError naming the file.

Writing: each shard goes to a temporary file beside its destination, is fsynced and renamed into
place, so a shard file that exists is complete; the index is written last, so a directory with an
index is a finished checkpoint that `from_pretrained` loads. A shard written here carries the sha256
of its data section in its header's metadata (`"sha256"`), checked whenever this module reads the
shard back (a resumed run's finished shards, a checkpoint we wrote read as input): flipped bytes
are found there; `from_pretrained` ignores the digest."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath

import torch
from torch import Tensor

from ..errors import UsageError
from ..io import atomic_path, write_text

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DEFINITIONS = ("config.json", "generation_config.json", INDEX)  # with the shards: what defines the model
DIGEST = "sha256"  # the key of a shard's data digest in its header's __metadata__
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def shard_name(index: int, count: int) -> str:
    """The name transformers gives shard `index` (1-based) of `count`."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


class Checkpoint:
    """A safetensors checkpoint directory, read one tensor at a time (module docstring).

    `keys()` lists its tensors in index order; `get_many(names)` reads some (CPU tensors of their
    stored dtype)."""

    def __init__(self, path: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_dir():
            raise UsageError(f"checkpoint {self.path} is not a directory")
        if not (self.path / "config.json").is_file():
            raise UsageError(f"checkpoint {self.path} has no config.json")
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError("weight_map is not a dict of tensor name -> shard file")
            except (ValueError, KeyError, TypeError) as exc:
                raise UsageError(f"{index}: not a safetensors index ({type(exc).__name__}: {exc})") from None
        elif (self.path / SINGLE).is_file():
            weight_map = None
        else:
            raise UsageError(
                f"checkpoint {self.path} has no safetensors weights ({INDEX} or {SINGLE}); convert .bin "
                "checkpoints with from_pretrained + save_pretrained(safe_serialization=True) first"
            )
        self.shards = [SINGLE] if weight_map is None else list(dict.fromkeys(weight_map.values()))
        self._meta: dict[str, tuple[str, list[int]]] = {}  # tensor -> (safetensors dtype, shape)
        self._verified: set[str] = set()  # shards whose data digest was checked by get_many
        for shard in self.shards:
            file = self._inside(shard)
            if not file.is_file():
                raise UsageError(f"shard {file} named by {INDEX} is missing")
            try:
                with safe_open(str(file), framework="pt") as handle:
                    held = {}
                    for name in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                        view = handle.get_slice(name)
                        held[name] = (view.get_dtype(), list(view.get_shape()))
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                raise UsageError(f"shard {file} is not a readable safetensors file: {exc}") from None
            if weight_map is None:
                weight_map = dict.fromkeys(held, SINGLE)
            wanted = [n for n, s in weight_map.items() if s == shard and n not in held]
            if wanted:
                raise UsageError(f"shard {file} does not hold {wanted[:5]} that {INDEX} puts there")
            self._meta.update(held)
        self.weight_map: dict[str, str] = weight_map

    def _inside(self, shard: str) -> Path:
        """The file of `shard` (a weight_map value), refused when it leaves the checkpoint directory: an
        absolute path, a `..` part, or a symbolic link resolving outside it, all of which would read a
        file the checkpoint does not hold. A link into the `blobs/` folder of a Hugging Face hub cache
        (the directory being `snapshots/<revision>/` of it) is how huggingface_hub stores downloads and
        is followed."""
        root = self.path.resolve()
        allowed = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
        file = self.path / shard
        lexical = not PurePath(shard).is_absolute() and ".." not in PurePath(shard).parts and "\\" not in shard
        if not lexical or not any(file.resolve().is_relative_to(a) for a in allowed):
            raise UsageError(
                f"{self.path / INDEX}: shard {shard!r} leaves the checkpoint directory {self.path}; expected "
                "the name of a file inside it"
            )
        return file

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get_many(self, names: Iterable[str]) -> dict[str, Tensor]:
        """The named tensors, each shard opened once and closed again: a shard is memory-mapped only
        while its tensors are copied out, so what was read never stays in this process's memory."""
        names = list(names)
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise KeyError(f"checkpoint {self.path} has no tensors {missing[:5]}")
        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for shard, group in by_shard.items():
            if shard not in self._verified:
                verify_shard(self.path / shard)
                self._verified.add(shard)
            out.update(read_shard(self.path / shard, group))
        return {name: out[name] for name in names}

    def copy_shard(self, names: Iterable[str], path: str | os.PathLike) -> None:
        """Writes the named tensors, unchanged, as one shard at `path` (write_shard), reading one tensor
        at a time: the embeddings and the head of a large vocabulary are never in memory together."""
        specs = {n: (self.dtype(n), self._meta[n][1]) for n in names}
        _write_shard(path, specs, lambda name: self.get_many([name])[name])

    def nbytes(self, names: Iterable[str] | None = None) -> int:
        """Bytes of the named tensors (all by default), from the shard headers."""
        total = 0
        for name in self.keys() if names is None else names:
            dtype, shape = self._meta[name]
            numel = 1
            for size in shape:
                numel *= size
            total += numel * _DTYPES.get(dtype, (None, 4))[1]
        return total

    def dtype(self, name: str) -> torch.dtype | None:
        """The stored dtype of tensor `name` (from its shard's header; None for a type torch lacks)."""
        return _DTYPES.get(self._meta[name][0], (None, 0))[0]

    def fingerprint(self) -> dict[str, dict[str, int | str]]:
        """{file: fingerprint} of every file that defines the model, what a resumed run checks it still
        reads: config.json, generation_config.json and the index (those present) by the sha256 of their
        content (small files; a changed rms_norm_eps or rope_theta would make a hybrid of two models);
        each shard by its size, mtime and the sha256 of its header (names, dtypes, shapes, offsets),
        which costs a few kilobytes of reading where hashing the data would read the whole model."""
        out: dict[str, dict[str, int | str]] = {}
        for name in DEFINITIONS:
            if (self.path / name).is_file():
                out[name] = {"sha256": hashlib.sha256((self.path / name).read_bytes()).hexdigest()}
        for name in self.shards:
            stat = (self.path / name).stat()
            header = hashlib.sha256(_read_header(self.path / name)[0]).hexdigest()
            out[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "header_sha256": header}
        return out


_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1), "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1), "U64": (None, 8), "U32": (None, 4), "U16": (None, 2),
}  # fmt: skip
_CODES = {dtype: code for code, (dtype, _) in _DTYPES.items() if dtype is not None}


def write_shard(path: str | os.PathLike, tensors: Mapping[str, Tensor]) -> None:
    """Writes `tensors` as one safetensors file, atomically (complete or absent), streaming each
    tensor's bytes to the file: no serialized copy of the shard is made in memory (safetensors'
    save_file builds one, as large as the shard). The header's metadata holds the sha256 of the data
    (module docstring). An OSError while writing (a full disk) is raised naming the file."""
    specs = {n: (tensors[n].dtype, list(tensors[n].shape)) for n in tensors}
    _write_shard(path, specs, tensors.__getitem__)


def _write_shard(path: str | os.PathLike, specs: Mapping[str, tuple], get) -> None:
    """write_shard of the tensors {name: (dtype, shape)} `specs`, each fetched by `get(name)` only when
    its bytes are written and dropped after: one tensor in memory at a time. The header is written
    with a placeholder digest of the same length and rewritten once the data is hashed."""
    names = sorted(specs)  # safetensors' own order: by name
    header: dict = {"__metadata__": {"format": "pt", DIGEST: "0" * 64}}
    offset = 0
    for name in names:
        dtype, shape = specs[name]
        if dtype not in _CODES:
            raise TypeError(f"{name}: safetensors cannot store {dtype}")
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size

    def encode() -> bytes:
        encoded = json.dumps(header, separators=(",", ":")).encode()
        return encoded + b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it

    digest = hashlib.sha256()
    with _naming("shard", path), atomic_path(path) as temp, open(temp, "wb") as f:
        encoded = encode()
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name in names:
            _append(f, get(name), digest)
        header["__metadata__"][DIGEST] = digest.hexdigest()
        f.seek(8)
        f.write(encode())  # the same length: the digest's 64 hex digits replace the placeholder's


def _append(f, tensor: Tensor, digest) -> None:
    """Writes the bytes of `tensor` to the open file `f` and adds them to `digest`; nothing of it is
    kept once this returns (a view left in a caller's variable would keep the tensor alive)."""
    t = tensor.detach().to("cpu").contiguous()
    if t.numel():
        chunk = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        digest.update(chunk)
        f.write(chunk)


@contextlib.contextmanager
def _naming(what: str, path: str | os.PathLike):
    """An OSError raised while writing `path` (a full disk: ENOSPC, a quota) raised again naming the
    file, with its errno kept: a bare "No space left on device" does not say which write failed."""
    try:
        yield
    except OSError as exc:
        code = exc.errno if exc.errno is not None else errno.EIO
        raise OSError(code, f"could not write {what} {path}: {exc.strerror or exc}", os.fspath(path)) from exc


def _read_header(path: str | os.PathLike) -> tuple[bytes, int]:
    """(the JSON header's bytes, the offset where the data starts) of a safetensors file."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        if size > 100_000_000:  # safetensors' own limit on a header
            raise UsageError(f"{path}: header of {size} bytes")
        return f.read(size), 8 + size


def verify_shard(path: str | os.PathLike) -> None:
    """Checks a shard's data against the sha256 its header records, when it records one (shards this
    module wrote); ValueError naming the file when they differ. Reads the whole data section."""
    raw, start = _read_header(path)
    try:
        recorded = json.loads(raw).get("__metadata__", {}).get(DIGEST)
    except (ValueError, AttributeError):
        raise UsageError(f"shard {path} has no readable safetensors header") from None
    if recorded is None:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    if digest.hexdigest() != recorded:
        raise UsageError(
            f"shard {path}: its data does not match the sha256 its header records (bytes changed after it was "
            "written: a failing disk or an edit); expected the shard as written"
        )


def is_complete_shard(path: str | os.PathLike, names: Iterable[str]) -> bool:
    """Whether `path` is a readable safetensors file holding exactly the tensors `names`, whose data
    matches the sha256 its header records (when it records one)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            if set(handle.keys()) != set(names):
                return False
        verify_shard(path)
    except Exception:  # noqa: BLE001 - absent, truncated, corrupt or changed: not finished
        return False
    return True


def write_index(directory: str | os.PathLike, weight_map: Mapping[str, str], total_size: int) -> None:
    """The index that makes `directory` a sharded checkpoint (written last, atomically; an OSError
    names the file)."""
    index = {"metadata": {"total_size": int(total_size)}, "weight_map": dict(sorted(weight_map.items()))}
    with _naming("the index", Path(directory) / INDEX):
        write_text(Path(directory) / INDEX, json.dumps(index, indent=2) + "\n")


def copy_side_files(source: str | os.PathLike, directory: str | os.PathLike) -> list[str]:
    """Copies config, generation config, tokenizer and other non-weight files of a checkpoint (an
    OSError names the file)."""
    copied = []
    for file in sorted(Path(source).iterdir()):
        if file.is_file() and not file.name.endswith(WEIGHT_SUFFIXES) and file.name != INDEX:
            with _naming("side file", Path(directory) / file.name), atomic_path(Path(directory) / file.name) as temp:
                shutil.copyfile(file, temp)
            copied.append(file.name)
    return copied


def read_shard(path: str | os.PathLike, names: Iterable[str]) -> dict[str, Tensor]:
    """The tensors `names` of one safetensors file (ValueError naming the file when it cannot be read).

    Each tensor is read with plain reads into memory of its own, not through a memory map: pages of a
    mapped file count in the process's resident memory while the map is open, so copying a tensor out
    of a map holds it twice (the embeddings and the head of a large vocabulary: twice 0.3 GB)."""
    try:
        raw, start = _read_header(path)
        header = json.loads(raw)
        out = {}
        with open(path, "rb", buffering=0) as f:
            for name in names:
                entry = header[name]
                dtype = _DTYPES.get(entry["dtype"], (None, 0))[0]
                if dtype is None:
                    raise ValueError(f"{name}: torch has no dtype {entry['dtype']}")
                begin, end = entry["data_offsets"]
                tensor = torch.empty(entry["shape"], dtype=dtype)
                if tensor.numel() * tensor.element_size() != end - begin:
                    raise ValueError(f"{name}: {end - begin} bytes for shape {entry['shape']} of {entry['dtype']}")
                _read_into(f, start + begin, tensor)
                out[name] = tensor
        return out
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"shard {path} is not readable: {type(exc).__name__}: {exc}") from None


def _read_into(f, offset: int, tensor: Tensor) -> None:
    """Fills the contiguous CPU `tensor` with the bytes of the open file `f` from `offset` on."""
    if tensor.numel() == 0:
        return
    buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    f.seek(offset)
    done = 0
    while done < len(buffer):
        got = f.readinto(buffer[done:])
        if not got:
            raise ValueError(f"the file ends {len(buffer) - done} bytes before the tensor at offset {offset}")
        done += got
