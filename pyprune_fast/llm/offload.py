"""Where the block pipeline's decoder blocks live between their turns: in memory (the model as given),
or on disk (`offload="disk"`), read from the input checkpoint's safetensors shards one block at a time
and written, pruned, to an output checkpoint at once.

On disk the model is a skeleton (accelerate's `init_empty_weights`: parameters on the meta device,
buffers real), so host memory holds one decoder block's weights, the calibration activations and
the pipeline's statistics; the modules before the first block (embeddings, not the head) are loaded
only while the calibration inputs are captured. `DiskStore.logits` evaluates the model the same way:
each block read once for every batch, the head loaded only after the blocks, without the embeddings.
A mixture-of-experts checkpoint that stores its experts one tensor per expert (Mixtral's and Qwen's hub
checkpoints, stock save_pretrained) has each block's experts fused as the model holds them when read,
and split back into the same keys when written (`checkpoint_names`): the output has the input's layout.
The output directory:

    model-00001-of-0000N.safetensors      every tensor outside the decoder blocks, copied unchanged
    model-0000(i+2)-of-0000N.safetensors  decoder block i, pruned (N = blocks + 1)
    model.safetensors.index.json          written last: the directory is then a finished checkpoint
    config.json, tokenizer files, ...     copied from the input
    pyprune_run.json                      the run's options, the input's fingerprint (every file that
                                          defines the model) and the sha256 of each kept result (--resume)
    pyprune_owl.json                      OWL's outlier ratios and block sparsities (kept for --resume)
    pyprune_scores/                       per-block scores of a global (whole-model) run

Every file is written to a temporary beside it and renamed when complete, so a shard that exists is
finished. A run that dies after block k resumes (`resume=True`) at block k + 1: the calibration inputs
of block k + 1 are recomputed by running the finished blocks (read back from the output when the
pipeline propagates pruned outputs, from the input when it propagates dense ones) — bit for bit the
inputs the uninterrupted run had, so the resumed result equals it. What resume reads back is checked,
never trusted: the run record's shape, the input's fingerprint (a changed config.json is named), the
kept results against their recorded sha256, each finished shard against the digest in its header."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UsageError
from ..io import write_text
from .blocks import accepts, capture_inputs
from .checkpoint import (
    Checkpoint,
    copy_side_files,
    is_complete_shard,
    read_shard,
    shard_name,
    write_index,
    write_shard,
)

RUN_FILE = "pyprune_run.json"
SCORES_DIR = "pyprune_scores"
OFFLOADS = (None, "disk")


def _set_tensor(root: nn.Module, name: str, value: Tensor) -> None:
    """Replaces the parameter or buffer `name` (dotted, relative to `root`) by `value`."""
    path, _, leaf = name.rpartition(".")
    module = root.get_submodule(path) if path else root
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        raise KeyError(name)


def _to_meta(root: nn.Module, names: list[str]) -> None:
    """Frees the named tensors of `root`: each replaced by a meta tensor of its shape and dtype."""
    for name in names:
        t = root.get_parameter(name) if _is_param(root, name) else root.get_buffer(name)
        _set_tensor(root, name, torch.empty(t.shape, dtype=t.dtype, device="meta"))


def _is_param(root: nn.Module, name: str) -> bool:
    path, _, leaf = name.rpartition(".")
    return leaf in (root.get_submodule(path) if path else root)._parameters


def _on_meta(module: nn.Module) -> list[str]:
    return [n for n, t in module.state_dict(keep_vars=True).items() if t.is_meta]


class MemoryStore:
    """Blocks that stay where they are (the model is in memory): nothing to load or write."""

    disk = False

    def remember(self, _name: str, compute: Callable[[], Any]) -> Any:
        return compute()

    @contextlib.contextmanager
    def front(self):
        yield

    @contextlib.contextmanager
    def block(self, _i: int, _block: nn.Module, *, source: str = "input", write: bool = False):
        yield


class DiskStore:
    """Blocks read from a checkpoint's shards and written, pruned, to an output checkpoint (module
    docstring). Build it with `open_disk_model`."""

    disk = True

    def __init__(self, checkpoint: Checkpoint, model: nn.Module, prefix: str, blocks: nn.ModuleList) -> None:
        self.checkpoint, self.model, self.prefix, self.blocks = checkpoint, model, prefix, blocks
        self.out: Path | None = None
        self.run: dict[str, Any] = {}  # the run record written to out/RUN_FILE
        self.writer = True  # False on the ranks other than 0 of a distributed run: they only read
        self.alone = True  # False in a distributed run: what is kept on disk is recomputed on resume
        self.count = len(blocks) + 1
        self.names = checkpoint_names(model, checkpoint.keys(), checkpoint.path)
        self.model_name = self.names.model  # checkpoint key -> the model's name for it
        known_names = set(self.model_name.values())
        self.local_names: list[list[str]] = []  # per block: names relative to the block
        self.block_names: list[list[str]] = []  # per block: the checkpoint keys of the same tensors
        for i, block in enumerate(blocks):
            local = list(block.state_dict(keep_vars=True))
            missing = [f"{prefix}.{i}.{n}" for n in local if f"{prefix}.{i}.{n}" not in known_names]
            if missing:
                raise UsageError(f"checkpoint {checkpoint.path} lacks {missing[:5]} of decoder block {i}")
            self.local_names.append(local)
            self.block_names.append([k for n in local for k in self.names.keys(f"{prefix}.{i}.{n}")])
        known = {n for names in self.block_names for n in names}
        self.front_names = [k for k in checkpoint.keys() if k not in known]
        unexpected = [k for k in self.front_names if self.model_name[k].startswith(prefix + ".")]
        if unexpected:
            raise UsageError(f"checkpoint {checkpoint.path} holds tensors no decoder block has: {unexpected[:5]}")

    # --- the output directory ------------------------------------------------------------------------

    def open_output(self, out: str | os.PathLike, options: dict[str, Any], resume: bool) -> int:
        """Prepares `out` for this run; returns the number of finished blocks (0 for a new run).

        A new run needs `out` absent or empty. resume=True continues the run recorded in `out`, which
        must have been started with the same options on the same (unchanged) input."""
        out = Path(out)
        source = str(self.checkpoint.path.resolve())
        run = {"options": options, "source": source, "input": self.checkpoint.fingerprint(), "kept": {}}
        record = out / RUN_FILE
        if record.is_file():
            if not resume:
                raise FileExistsError(
                    f"{out} holds an earlier run (see {RUN_FILE}); resume it (resume=True, --resume) or choose "
                    "another output directory"
                )
            earlier = _read_record(record)
            changed = sorted(k for k in set(earlier["options"]) | set(options)
                             if earlier["options"].get(k) != options.get(k))  # fmt: skip
            if changed:
                raise UsageError(
                    f"cannot resume the run in {out}: it was started with other options: "
                    + ", ".join(f"{k}={earlier['options'].get(k)!r} (now {options.get(k)!r})" for k in changed)
                )
            if earlier["source"] != run["source"]:
                raise UsageError(f"cannot resume the run in {out}: its input checkpoint {earlier['source']} is "
                                 f"another one than {source}")  # fmt: skip
            files = sorted(f for f in set(earlier["input"]) | set(run["input"])
                           if earlier["input"].get(f) != run["input"].get(f))  # fmt: skip
            if files:
                raise UsageError(
                    f"cannot resume the run in {out}: its input checkpoint {source} has changed since the run "
                    f"started: {', '.join(files)} (the resumed blocks would come from another model); restore "
                    "them or start a new run"
                )
            run["kept"] = earlier["kept"]
        elif out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FileExistsError(f"{out} exists and holds no pyprune_fast run: choose an empty or new directory")
        else:
            out.mkdir(parents=True, exist_ok=True)
            write_text(record, json.dumps(run, indent=2) + "\n")
        self.out, self.run = out, run
        front = out / shard_name(1, self.count)
        if not is_complete_shard(front, self.front_names):
            self.checkpoint.copy_shard(self.front_names, front)
        done = 0
        while done < len(self.blocks) and self.finished(done):
            done += 1
        return done

    def attach(self, out: str | os.PathLike) -> None:
        """Reads `out` as prepared by the writing rank (rank 0) of a distributed run; writes nothing."""
        self.out, self.writer = Path(out), False

    def shard(self, i: int) -> Path:
        return self.out / shard_name(i + 2, self.count)

    def finished(self, i: int) -> bool:
        return self.out is not None and is_complete_shard(self.shard(i), self.block_names[i])

    def finish(self) -> Path:
        """Writes the side files and, last, the index: `out` is then a complete checkpoint."""
        weight_map = {n: shard_name(1, self.count) for n in self.front_names}
        for i, names in enumerate(self.block_names):
            weight_map.update({n: self.shard(i).name for n in names})
        copy_side_files(self.checkpoint.path, self.out)
        write_index(self.out, weight_map, self.checkpoint.nbytes())
        return self.out

    def remember(self, name: str, compute: Callable[[], Any]) -> Any:
        """compute() the first time, the kept result on resume. What is kept is a list of per-block
        lists of fractions (OWL's outlier ratios and block sparsities), written to
        `out/pyprune_<name>.json` with its sha256 in the run record (the record first: a run killed in
        between recomputes it). On resume the file is refused (ValueError naming it) when it is not
        the one the run wrote or not one number in [0, 1] per block in each list: a changed ratio would
        prune other blocks than the run's options say."""
        path = self.out / f"pyprune_{name}.json"
        if path.is_file() and self.writer and self.alone:
            return self._kept(name, path)
        value = compute()  # every rank of a distributed run computes it: they take part in its collectives
        if self.writer:
            text = json.dumps(value) + "\n"
            self.run["kept"][name] = hashlib.sha256(text.encode()).hexdigest()
            write_text(self.out / RUN_FILE, json.dumps(self.run, indent=2) + "\n")
            write_text(path, text)
        return value

    def _kept(self, name: str, path: Path) -> Any:
        """The value kept in `path` by remember(name), checked (remember's docstring)."""
        raw = path.read_bytes()
        if hashlib.sha256(raw).hexdigest() != self.run["kept"].get(name):
            raise UsageError(
                f"{path} was changed after the run wrote it (its sha256 is not the one {RUN_FILE} records); "
                "expected the file as the run wrote it: delete it to have it recomputed, or start a new run"
            )
        blocks = len(self.blocks)
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        fractions = isinstance(value, list) and all(
            isinstance(part, list) and len(part) == blocks
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1
                    for v in part)
            for part in value
        )  # fmt: skip
        if not value or not fractions:
            raise UsageError(
                f"{path}: expected lists of one finite number in [0, 1] per decoder block ({blocks}), got "
                f"{raw[:200].decode(errors='replace')!r}; delete it to have it recomputed"
            )
        return value

    def scores_dir(self) -> Path:
        path = self.out / SCORES_DIR
        path.mkdir(exist_ok=True)
        return path

    # --- blocks and the modules in front of them ------------------------------------------------------

    def _names_of(self, module: nn.Module | None) -> set[str]:
        """The model's names of the tensors of `module` (a submodule of the model; none for None)."""
        for path, candidate in self.model.named_modules():
            if candidate is module:
                return {f"{path}.{n}" if path else n for n in module.state_dict(keep_vars=True)}
        return set()

    def _untied(self, module: nn.Module | None) -> set[str]:
        """The names of `module`'s tensors when the input embeddings and the head share none (else none:
        a tied head is the embeddings). The skeleton is tied first (as loading it does) to tell."""
        model = self.model
        inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if inputs is None or head is None:
            return set()
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        shared = {id(t) for t in inputs.parameters()} & {id(t) for t in head.parameters()}
        return set() if shared else self._names_of(module)

    @contextlib.contextmanager
    def _outside(self, skip: set[str]):
        """The tensors outside the decoder blocks loaded but those named in `skip` (left on the meta
        device) for the duration, then freed again."""
        keys = [k for k in self.front_names if self.model_name[k] not in skip]
        for key, value in self.checkpoint.get_many(keys).items():
            with contextlib.suppress(KeyError, AttributeError):  # a tensor the model lacks is only copied
                _set_tensor(self.model, self.model_name[key], value)
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()
        outside = [n for n in _on_meta(self.model) if not n.startswith(self.prefix + ".") and n not in skip]
        if outside:
            raise UsageError(f"checkpoint {self.checkpoint.path} lacks {outside[:5]}")
        try:
            yield
        finally:
            _to_meta(self.model, [n for n in self.model.state_dict(keep_vars=True)
                                  if not n.startswith(self.prefix + ".")])  # fmt: skip
            _release_freed_memory()

    def front(self):
        """The tensors outside the decoder blocks loaded (to capture the first block's inputs), then
        freed again; the head (lm_head) stays unloaded unless the embeddings are tied to it: nothing
        after the first block runs."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        return self._outside(self._untied(head))

    def _load(self, i: int, block: nn.Module, source: str) -> None:
        """Block i's tensors read from the input checkpoint (or the output), experts stored one tensor
        each fused as the model holds them (Names)."""
        if source == "output":
            stored = read_shard(self.shard(i), self.block_names[i])
        else:
            stored = self.checkpoint.get_many(self.block_names[i])
        for n in self.local_names[i]:
            _set_tensor(block, n, self.names.fuse(f"{self.prefix}.{i}.{n}", stored))

    @contextlib.contextmanager
    def block(self, i: int, block: nn.Module, *, source: str = "input", write: bool = False):
        """Block i's weights read (from the input checkpoint, or from the output for source="output")
        for the duration; with `write`, written to its output shard at the end (not on an error);
        then freed."""
        local = self.local_names[i]
        self._load(i, block, source)
        try:
            yield
            if write and self.writer:
                tensors = {}
                for n in local:
                    value = block.get_parameter(n) if _is_param(block, n) else block.get_buffer(n)
                    tensors.update(self.names.split(f"{self.prefix}.{i}.{n}", value))
                write_shard(self.shard(i), tensors)
        finally:
            _to_meta(block, local)
            _release_freed_memory()

    @contextlib.contextmanager
    def streamed(self):
        """The whole model usable for inference with one decoder block in memory at a time: the tensors
        outside the blocks loaded for the duration, each block read from the checkpoint when it is
        called and freed when it returns. Every block is read again at every forward: for many
        forwards over the same blocks (perplexity) `logits` reads each block once."""
        handles = []
        for i, block in enumerate(self.blocks):

            def load(module, _args, i=i):
                self._load(i, module, "input")

            def free(module, _args, _output, i=i):
                _to_meta(module, self.local_names[i])
                _release_freed_memory()

            handles += [block.register_forward_pre_hook(load), block.register_forward_hook(free)]
        try:
            with self._outside(set()):
                yield self.model
        finally:
            for h in handles:
                h.remove()

    def logits(self, batches: list[dict[str, Tensor]], progress: bool | None = None) -> Iterator[Tensor]:
        """The model's logits for each batch of inputs (keyword arguments of its forward: input_ids,
        attention_mask), yielded one batch at a time, each block read once for all batches:

            1. the embeddings loaded: every batch's inputs of block 0 captured (llm.blocks), then freed
            2. each block read, run on every batch (its outputs replace its inputs), freed
            3. the rest (final norm, head) loaded, the embeddings not: the model's own forward on each
               batch, its blocks replaced by one that returns the batch's last hidden states

        Bit for bit the logits of the loaded model's forward on each batch (each block runs on the same
        inputs with the same arguments). Host memory: one block, the hidden states of every batch
        (tokens × hidden size in the model's dtype), the head and one batch's logits. progress: a tqdm
        bar over the blocks; None shows it only on a terminal."""
        from tqdm.auto import tqdm

        extra = {"use_cache": False} if accepts(self.model, "use_cache") else {}

        def forward(model, inputs):
            return model(**inputs, **extra)

        with self.front():
            inputs = capture_inputs(self.model, self.blocks[0], batches, torch.device("cpu"), forward=forward)
        bare: list[bool] = []  # whether the last block returned a bare tensor (else a tuple)
        last = self.blocks[len(self.blocks) - 1]
        hook = last.register_forward_hook(lambda _m, _a, out: bare.append(isinstance(out, Tensor)))
        disable = None if progress is None else not progress
        try:
            for i, block in enumerate(tqdm(self.blocks, desc="perplexity", unit="block", disable=disable)):
                with self.block(i, block):
                    inputs.advance(block)
        finally:
            hook.remove()
        yield from self._head(batches, _Replay(inputs.hidden, bare[-1]), forward)

    def _head(self, batches: list[dict[str, Tensor]], replay: _Replay, forward) -> Iterator[Tensor]:
        """The model's forward on each batch with every block replaced by `replay` and the embeddings
        (unless tied to the head) by zeros: what follows the blocks (final norm, head, whatever the
        model does to its logits) on the replayed hidden states; one batch's logits at a time."""
        embeddings = self.model.get_input_embeddings()
        skip = self._untied(embeddings) if isinstance(embeddings, nn.Embedding) else set()
        originals = list(self.blocks)
        try:
            for i in range(len(self.blocks)):
                self.blocks[i] = replay
            if skip:
                self.model.set_input_embeddings(_Zeros(embeddings))
            with self._outside(skip):
                for j, batch in enumerate(batches):
                    replay.j = j
                    yield forward(self.model, batch).logits
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block
            self.model.set_input_embeddings(embeddings)


class _Replay(nn.Module):
    """Stands for every decoder block once their outputs are known: returns batch j's last hidden
    states (as a bare tensor or a 1-tuple, as the blocks did), whatever it is given."""

    def __init__(self, hidden: list[Tensor], bare: bool) -> None:
        super().__init__()
        self.hidden, self.bare, self.j = hidden, bare, 0

    def forward(self, *_args, **_kwargs):
        return self.hidden[self.j] if self.bare else (self.hidden[self.j],)


class _Zeros(nn.Module):
    """Stands for the input embeddings while the blocks' outputs are replayed: zeros of their width and
    dtype (the blocks that would take them are replayed)."""

    def __init__(self, embeddings: nn.Embedding) -> None:
        super().__init__()
        self.dim, self.dtype = embeddings.embedding_dim, embeddings.weight.dtype

    def forward(self, ids: Tensor) -> Tensor:
        return torch.zeros(*ids.shape, self.dim, dtype=self.dtype, device=ids.device)


def _read_record(record: Path) -> dict[str, Any]:
    """The run record `record` as open_output wrote it, or ValueError naming it and what was expected
    (a file edited by hand or by another program is refused, not half trusted)."""
    expected = (
        "expected a JSON object with 'options' (an object), 'source' (a string), 'input' (an object) and "
        "'kept' (an object), as pyprune_fast writes it"
    )
    try:
        earlier = json.loads(record.read_bytes())
    except ValueError as exc:
        raise UsageError(f"{record}: {expected}; it is not readable JSON ({exc}): choose another output "
                         "directory") from None  # fmt: skip
    kinds = {"options": dict, "source": str, "input": dict, "kept": dict}
    if not isinstance(earlier, dict) or not all(isinstance(earlier.get(k), t) for k, t in kinds.items()):
        got = json.dumps(earlier)[:200]
        raise UsageError(f"{record}: {expected}, got {got}; it was changed after the run wrote it: choose another "
                         "output directory")  # fmt: skip
    return earlier


def _release_freed_memory() -> None:
    """Gives the heap memory freed with a block back to the system (glibc's malloc_trim): tensors of a
    few MB to 32 MB come from the heap, whose free space glibc otherwise keeps, so a disk-streamed run's
    RSS would creep up block after block."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc() if sys.platform.startswith("linux") else None


@dataclass
class Names:
    """How a checkpoint's tensors are the model's (`checkpoint_names`): `model` {checkpoint key: the
    model's name for it}; `stacked` {model name: per part, the checkpoint keys of experts 0, 1, …} for a
    fused expert tensor that the checkpoint stores one tensor per expert (Mixtral's
    `block_sparse_moe.experts.3.w1.weight`, Qwen's `mlp.experts.3.gate_proj.weight`): the model's tensor
    is the per-expert tensors stacked (dim 0), the parts concatenated along dim 1 (gate | up), as
    transformers' MergeModulelist(dim=0) and Concatenate(dim=1) build it when it loads them."""

    model: dict[str, str]
    stacked: dict[str, list[list[str]]]
    _key: dict[str, str] = field(init=False, repr=False)  # the model's name -> its one checkpoint key

    def __post_init__(self) -> None:
        self._key = {name: key for key, name in self.model.items() if name not in self.stacked}

    def keys(self, name: str) -> list[str]:
        """The checkpoint keys of the model's tensor `name`."""
        parts = self.stacked.get(name)
        if parts is not None:
            return [k for part in parts for k in part]
        return [self._key[name]]

    def fuse(self, name: str, stored: dict[str, Tensor]) -> Tensor:
        """The model's tensor `name` from the checkpoint's tensors `stored` (by key), which it takes out
        of `stored`: a block's per-expert tensors are freed as they are stacked."""
        parts = self.stacked.get(name)
        if parts is None:
            return stored.pop(self._key[name])
        stacks = [torch.stack([stored.pop(k) for k in part]) for part in parts]
        return stacks[0] if len(stacks) == 1 else torch.cat(stacks, dim=1)

    def split(self, name: str, tensor: Tensor) -> dict[str, Tensor]:
        """{checkpoint key: tensor} of the model's tensor `name` as the checkpoint stores it (views of
        `tensor`): `fuse`'s inverse."""
        parts = self.stacked.get(name)
        if parts is None:
            return {self._key[name]: tensor}
        chunks = tensor.chunk(len(parts), dim=1) if len(parts) > 1 else (tensor,)
        return {k: chunk[e] for part, chunk in zip(parts, chunks) for e, k in enumerate(part)}


def _stacks(transform: Any) -> bool:
    """Whether a transformers WeightConverter only stacks per-expert tensors (MergeModulelist(dim=0)),
    then concatenates its source patterns along dim 1 (Concatenate(dim=1)) when it has several."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in transform.operations]
    if len(transform.source_patterns) == 1:
        return ops == [("MergeModulelist", 0)]
    return ops == [("MergeModulelist", 0), ("Concatenate", 1)]


def checkpoint_names(model: nn.Module, keys: list[str], where: str | os.PathLike) -> Names:
    """How the checkpoint keys `keys` (of the checkpoint at `where`, named in errors) map to the model's
    tensors (Names): each key renamed by the renaming rules transformers applies when it loads this
    architecture (GPT-NeoX's embed_out -> lm_head, Mixtral's block_sparse_moe -> mlp), experts stored
    one per key gathered into the fused tensor transformers builds of them. UsageError for any other
    conversion (split, transposed, quantized tensors), or experts missing from a stack."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        transforms = get_model_conversion_mapping(model)
    except ImportError:  # transformers < 5 loads checkpoints by name
        return Names({key: key for key in keys}, {})
    names: dict[str, str] = {}
    groups: dict[str, dict[tuple[int, int], str]] = {}
    for key in keys:
        name, slot = key, None
        for transform in transforms:
            renamed, matched = transform.rename_source_key(name)
            if matched is None:
                continue
            if not isinstance(transform, WeightRenaming):
                expert = re.search(re.escape(matched).replace(r"\*", r"(\d+)"), name) if _stacks(transform) else None
                if expert is None:
                    raise UsageError(
                        f"checkpoint {where}: tensor {key!r} is converted by transformers when loaded "
                        f"({type(transform).__name__}); offload='disk' needs a checkpoint whose tensors are the "
                        "model's parameters one to one, or experts stored one tensor each (save the model with "
                        "save_pretrained first)"
                    )
                slot = (transform.source_patterns.index(matched), int(expert.group(1)))
            name = renamed
        names[key] = name
        if slot is not None:
            groups.setdefault(name, {})[slot] = key
    stacked = {}
    for name, slots in groups.items():
        count = 1 + max(e for _, e in slots)
        parts = 1 + max(p for p, _ in slots)
        missing = [(p, e) for p in range(parts) for e in range(count) if (p, e) not in slots]
        if missing:
            raise UsageError(f"checkpoint {where}: the experts of {name} lack {len(missing)} tensors "
                             f"(part, expert) {missing[:5]}")  # fmt: skip
        stacked[name] = [[slots[p, e] for e in range(count)] for p in range(parts)]
    return Names(names, stacked)


def open_disk_model(path: str | os.PathLike) -> tuple[nn.Module, DiskStore]:
    """(skeleton model, store) of the causal LM checkpoint in the directory `path`: parameters on the
    meta device, read block by block by the store. Needs transformers and accelerate."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .blocks import find_blocks

    checkpoint = Checkpoint(path)
    config = AutoConfig.from_pretrained(checkpoint.path, local_files_only=True)
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in getattr(config, "architectures", None) or []):
        raise UsageError(f"{checkpoint.path} does not hold a causal LM (its config names no *ForCausalLM architecture)")
    dtype = _stored_dtype(checkpoint)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    prefix, blocks = find_blocks(model)
    return model, DiskStore(checkpoint, model, prefix, blocks)


def _stored_dtype(checkpoint: Checkpoint) -> torch.dtype:
    """The floating dtype of the checkpoint's first weight (float32 if none)."""
    for name in checkpoint.keys():
        dtype = checkpoint.dtype(name)
        if name.endswith(".weight") and dtype is not None and dtype.is_floating_point:
            return dtype
    return torch.float32
