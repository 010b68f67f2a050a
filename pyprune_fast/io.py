"""Mask files, and writing any file atomically.

A mask file is a safetensors file. Each mask is stored either bit-packed (`packed=True`, the default:
the flattened mask as uint8 bytes, entry i in bit i % 8 of byte i // 8, least significant bit first,
the last byte zero-padded) or as a bool tensor of the mask's shape. The safetensors metadata holds
the format marker, the packing, every mask's shape (JSON), the library version and the caller's
metadata (criterion, sparsity, granularity, model, ...).

Every write goes to a temporary file in the destination's directory, is flushed and fsync'ed, then
renamed over the destination (os.replace, atomic on POSIX and Windows), and the directory entry is
fsync'ed: a reader sees the old file or the new one, never a part of one; an error or an interrupt
leaves the old file as it was and no temporary file behind; so does SIGTERM where the program has
not installed its own handler. A writer killed with SIGKILL cannot clean up: its temporary
(`.<name>.<pid>.<random>.tmp`, the writer's process id in the name) is removed by the next write of
the same file once that process is gone."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

FORMAT = "pyprune_fast.masks"
_RESERVED = ("format", "packing", "shapes", "pyprune_fast_version")
_BITS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)

PathLike = str | os.PathLike


def _fsync_dir(directory: str) -> None:
    """Makes a rename in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: PathLike) -> None:
    """Flushes a written file's data to disk.

    Args:
        path: the written file.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mode_for(path: str) -> int:
    """The permissions the file will get: those of the file it replaces, else 0o666 less the umask
    (mkstemp creates 0o600)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _alive(pid: int) -> bool:
    """Whether a process with this id exists (True where that cannot be told)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):
        return True
    return True


def remove_stale_temps(path: PathLike) -> list[str]:
    """Removes the temporaries that writers of `path` killed mid-write (SIGKILL, power loss) left
    beside it: files `.<name>.<pid>.<random>.tmp` (new_temp) and directories
    `.<name>.<pid>.<random>.partial` (new_temp_dir) whose writer process no longer exists. Returns the
    removed paths. Temporaries of live processes, of this process, and every other entry are left alone.

    Args:
        path: the destination whose temporaries are looked for beside it.

    Returns:
        The removed paths.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    pattern = re.compile(rf"\.{re.escape(os.path.basename(path))}\.([0-9]+)\.[A-Za-z0-9_]+\.(tmp|partial)")
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or _alive(int(match.group(1))):
            continue
        stale = os.path.join(directory, name)
        if os.path.islink(stale):
            continue
        if match.group(2) == "tmp" and os.path.isfile(stale):
            with contextlib.suppress(OSError):
                os.unlink(stale)
                removed.append(stale)
        elif match.group(2) == "partial" and os.path.isdir(stale):
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    return removed


def new_temp(path: PathLike) -> str:
    """An empty temporary file `.<name>.<pid>.<random>.tmp` next to `path` (same directory, so a rename
    onto `path` is atomic); the stale temporaries of `path` that dead writers left are removed first.

    Args:
        path: the destination.

    Returns:
        The temporary file's path.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    remove_stale_temps(path)
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    return temp


def commit(temp: str, path: PathLike) -> None:
    """fsync `temp`, give it the permissions `path` has (or the umask's), rename it onto `path`, fsync
    the directory.

    Args:
        temp: the complete temporary file.
        path: the destination.
    """
    fsync_file(temp)
    with contextlib.suppress(OSError):
        os.chmod(temp, _mode_for(os.fspath(path)))
    os.replace(temp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(os.fspath(path))))


def discard(temp: str) -> None:
    if os.path.isdir(temp) and not os.path.islink(temp):
        shutil.rmtree(temp, ignore_errors=True)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)


def new_temp_dir(path: PathLike) -> str:
    """An empty temporary directory `.<name>.<pid>.<random>.partial` next to `path` (a rename onto
    `path` is atomic); the stale temporaries of `path` that dead writers left are removed first.

    Args:
        path: the destination directory.

    Returns:
        The temporary directory's path.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temps(path)
    return tempfile.mkdtemp(dir=directory, prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=".partial")


def commit_dir(temp: str, path: PathLike) -> None:
    """Renames the complete directory `temp` onto `path`; an existing `path` is moved aside first and
    removed only once the new one is in place (put back if the rename fails).

    Args:
        temp: the complete temporary directory.
        path: the destination.
    """
    path = os.fspath(path)
    old = None
    if os.path.lexists(path):
        old = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.")
        os.rmdir(old)
        os.replace(path, old)
    try:
        os.replace(temp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    if old is not None:
        discard(old)


class _Terminated(BaseException):
    """SIGTERM arrived while a file was being written."""


@contextlib.contextmanager
def _sigterm_cleans_up() -> Iterator[None]:
    """SIGTERM handled like SIGINT inside the block: where SIGTERM has its default action (to end the
    process at once, leaving a temporary behind) and in the main thread, it raises inside the block so
    that the temporary is removed, and is then delivered again with its default action: the process
    still ends by SIGTERM. A handler the program installed itself is left in charge."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def terminated(signum, frame):
        raise _Terminated

    signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yields a temporary path to write in full; on success it replaces `path` atomically, on any
    error or interrupt (BaseException, SIGTERM too: see _sigterm_cleans_up) it is removed and `path`
    is left untouched. A temporary left by a writer killed with SIGKILL is removed by the next write
    of `path` (remove_stale_temps).

    Args:
        path: the destination.

    Returns:
        A context manager yielding the temporary path.
    """
    with _sigterm_cleans_up():
        temp = new_temp(path)
        try:
            yield temp
            commit(temp, path)
        except BaseException:
            discard(temp)
            raise


class Staged:
    """Several files written to temporaries next to their destinations, then renamed onto them together
    by commit(): a failure or an interrupt before commit() replaces none of the destinations and leaves
    no temporary behind (use as a context manager)."""

    def __init__(self) -> None:
        self._pending: list[tuple[str, str]] = []

    def path(self, path: PathLike) -> str:
        """A temporary path to write `path`'s content to."""
        temp = new_temp(path)
        self._pending.append((temp, os.fspath(path)))
        return temp

    def directory(self, path: PathLike) -> str:
        """A temporary directory to write `path`'s content to (a whole directory, e.g. a Hugging Face
        `save_pretrained` output), renamed onto `path` by commit()."""
        temp = new_temp_dir(path)
        self._pending.append((temp, os.fspath(path)))
        return temp

    def commit(self) -> list[str]:
        """Renames every temporary onto its destination; returns the destinations."""
        done = []
        while self._pending:
            temp, path = self._pending[0]
            (commit_dir if os.path.isdir(temp) else commit)(temp, path)
            self._pending.pop(0)
            done.append(path)
        return done

    def discard(self) -> None:
        while self._pending:
            discard(self._pending.pop()[0])

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def write_bytes(path: PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically.

    Args:
        path: the destination.
        data: the file's content.
    """
    with atomic_path(path) as temp, open(temp, "wb") as f:
        f.write(data)


def write_text(path: PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically.

    Args:
        path: the destination.
        text: the file's content.
    """
    write_bytes(path, text.encode("utf-8"))


# --- masks --------------------------------------------------------------------------------------------


def pack_bits(mask: Tensor) -> Tensor:
    """A bool tensor as uint8 bytes: entry i of the flattened mask is bit i % 8 of byte i // 8 (LSB first).

    Args:
        mask: a bool tensor.

    Returns:
        A 1-D uint8 tensor of ceil(numel / 8) bytes, the last one zero-padded.
    """
    flat = mask.detach().reshape(-1).cpu()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _BITS).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The inverse of pack_bits for a mask of `shape`.

    Args:
        packed: the bytes of pack_bits.
        shape: the mask's shape.

    Returns:
        The bool mask.
    """
    numel = 1
    for d in shape:
        numel *= d
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise ValueError(
            f"packed mask of {packed.numel()} {packed.dtype} values does not fit shape {tuple(shape)} "
            f"(expected {(numel + 7) // 8} uint8)"
        )
    bits = (packed.unsqueeze(1) & _BITS).ne(0).reshape(-1)
    return bits[:numel].reshape(shape)


def _check_masks(masks: Any) -> dict[str, Tensor]:
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict of name -> bool Tensor, got {type(masks).__name__}")
    for name, mask in masks.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"masks keys must be non-empty str parameter names, got {name!r}")
        if not isinstance(mask, Tensor):
            raise TypeError(f"masks[{name!r}] must be a Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"masks[{name!r}] must be a bool tensor (True = keep), got {mask.dtype}")
    return dict(masks)


def _metadata_strings(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of str -> value, got {type(metadata).__name__}")
    out = {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be str, got {key!r}")
        if key in _RESERVED:
            raise ValueError(f"metadata key {key!r} is reserved (set by save_masks); reserved: {list(_RESERVED)}")
        out[key] = value if isinstance(value, str) else json.dumps(value)
    return out


def save_masks(
    path: PathLike, masks: Mapping[str, Tensor], metadata: Mapping[str, Any] | None = None, *, packed: bool = True
) -> None:
    """Writes keep-masks (True = kept) to a safetensors file, atomically.

    `metadata`: str keys; str values are stored as they are, others as JSON (e.g. criterion,
    sparsity, granularity, model). The library version, the packing and the shapes are added.
    `packed=True` stores 1 bit per entry, `packed=False` a bool tensor per mask.

    Args:
        path: the file to write.
        masks: {parameter name: bool keep-mask}.
        metadata: what to record with them.
        packed: 1 bit per entry (True) or a bool tensor per mask.
    """
    from safetensors.torch import save_file

    from ._version import __version__

    masks = _check_masks(masks)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if not isinstance(packed, bool):
        raise TypeError(f"packed must be a bool, got {type(packed).__name__}")
    meta = _metadata_strings(metadata)
    meta.update(
        format=FORMAT,
        packing="bits-lsb" if packed else "bool",
        shapes=json.dumps({n: list(m.shape) for n, m in masks.items()}),
        pyprune_fast_version=__version__,
    )
    if packed:
        tensors = {n: pack_bits(m) for n, m in masks.items()}
    else:
        tensors = {n: m.detach().cpu().contiguous() for n, m in masks.items()}
    with atomic_path(path) as temp:
        save_file(tensors, temp, metadata=meta)


def mask_metadata(path: PathLike) -> dict[str, str]:
    """The metadata of a mask file: the caller's keys plus format, packing, shapes, pyprune_fast_version.

    Args:
        path: a mask file.

    Returns:
        {key: str} (non-str values as written by save_masks: JSON).
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a mask file (a .safetensors file written by save_masks)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:
        raise ValueError(f"{path} is not a safetensors file ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pyprune_fast mask file (metadata format={meta.get('format')!r})")
    absent = [k for k in _RESERVED if k not in meta]
    if absent:
        raise ValueError(f"{path}: the mask file's metadata lacks {absent}")
    return meta


def _recorded_shapes(text: str, path: str) -> dict[str, tuple[int, ...]]:
    """The `shapes` metadata of a mask file: a JSON object of name -> list of non-negative ints."""
    try:
        shapes = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{path}: corrupt mask file: its 'shapes' metadata is not JSON ({exc})") from None
    if not isinstance(shapes, dict):
        raise ValueError(
            f"{path}: corrupt mask file: its 'shapes' metadata must map names to shapes, got {type(shapes).__name__}"
        )
    out = {}
    for name, shape in shapes.items():
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ValueError(
                f"{path}: corrupt mask file: the shape recorded for {name!r} must be a list of non-negative ints, "
                f"got {shape!r}"
            )
        extent = 1
        for d in shape:
            extent *= max(d, 1)
        if extent >= 2**63:  # a tensor torch can index: every dim and their product below 2^63
            raise ValueError(
                f"{path}: corrupt mask file: the shape recorded for {name!r}, {shape!r}, is beyond any tensor "
                "(its dims' product must be below 2^63)"
            )
        out[name] = tuple(shape)
    return out


def _check_stored(path: str, shapes: Mapping[str, tuple[int, ...]], packing: str) -> None:
    """The file's tensors as its header declares them (nothing read yet) against the recorded shapes:
    a packed mask must be uint8 of ceil(numel / 8) bytes, an unpacked one bool of its shape."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        stored = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118 - a safetensors handle
        if set(stored) != set(shapes):
            raise ValueError(f"{path}: the tensors {sorted(stored)} do not match the recorded shapes {sorted(shapes)}")
        for name, shape in shapes.items():
            numel = 1
            for d in shape:
                numel *= d
            want = ("U8", [(numel + 7) // 8]) if packing == "bits-lsb" else ("BOOL", list(shape))
            got = (stored[name].get_dtype(), list(stored[name].get_shape()))
            if got != want:
                raise ValueError(
                    f"{path}: mask {name!r}: the file's {got[0]} {got[1]} does not fit shape {tuple(shape)} "
                    f"(packing {packing}: expected {want[0]} {want[1]})"
                )


def load_masks(path: PathLike, model: nn.Module | None = None) -> dict[str, Tensor]:
    """Reads a mask file written by save_masks: {name: bool Tensor} on the CPU, True = kept.

    With `model`, every mask must name a parameter of the model with the same shape (the masks may
    cover only some parameters); otherwise ValueError lists the names the model lacks and the
    shapes that differ.

    Args:
        path: a mask file written by save_masks.
        model: the model the masks must fit, if given.

    Returns:
        {parameter name: bool keep-mask} on the CPU.
    """
    from safetensors.torch import load_file

    meta = mask_metadata(path)
    shapes = _recorded_shapes(meta["shapes"], os.fspath(path))
    if meta["packing"] not in ("bits-lsb", "bool"):
        raise ValueError(f"{path}: unknown packing {meta['packing']!r} (expected 'bits-lsb' or 'bool')")
    _check_stored(os.fspath(path), shapes, meta["packing"])
    stored = load_file(os.fspath(path))
    if meta["packing"] == "bits-lsb":
        masks = {n: unpack_bits(stored[n], shapes[n]) for n in shapes}
    else:
        masks = {n: stored[n] for n in shapes}
    if model is not None:
        check_against(masks, model, what=os.fspath(path))
    return masks


def check_against(masks: Mapping[str, Tensor], model: nn.Module, what: str = "masks") -> None:
    """ValueError naming every mask whose parameter the model lacks or whose shape differs from it.

    Args:
        masks: {parameter name: mask}.
        model: the model they must fit.
        what: how the error names the masks.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = dict(model.named_parameters())
    missing = [n for n in masks if n not in named]
    differ = [
        f"{n}: mask {tuple(m.shape)} vs parameter {tuple(named[n].shape)}"
        for n, m in masks.items()
        if n in named and tuple(m.shape) != tuple(named[n].shape)
    ]
    problems = []
    if missing:
        problems.append(f"names the model does not have: {missing}")
    if differ:
        problems.append(f"shapes that differ: {differ}")
    if problems:
        raise ValueError(f"{what} does not match the model: " + "; ".join(problems))
