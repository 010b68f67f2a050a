"""Pruning a checkpoint larger than we want in memory: `llm.prune(path, offload="disk")` streaming a
synthetic Llama-architecture checkpoint (random weights, written here block by block, so that making
it never holds the model in memory either) against what users run today, `from_pretrained` and
pruning in memory. Each run is a fresh process, so its peak RSS (ru_maxrss) is the run's own.

`run_cli` runs the whole `pyprune-fast prune --offload disk` command (pruning, the dense and pruned
evaluations, the report) and records the peak RSS and the time of each of its phases (`Phases`)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..llm.checkpoint import shard_name, write_index, write_shard

# ≈ 3.3 B parameters, 6.6 GB in bfloat16: 28 blocks of hidden 3072, MLP 8192, 24 heads (8 KV heads).
BIG = {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
       "num_key_value_heads": 8, "vocab_size": 32000}  # fmt: skip
# ≈ 3.5 B parameters, 7.0 GB in bfloat16: a Mixtral of 16 blocks, hidden 2048, 8 experts of width 4096
# (top-2), 16 heads (4 KV heads); the experts hold 95 % of each block.
BIG_MOE = {"hidden_size": 2048, "intermediate_size": 4096, "num_hidden_layers": 16, "num_attention_heads": 16,
           "num_key_value_heads": 4, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000}  # fmt: skip
# ≈ 3.1 B parameters, 6.1 GB in bfloat16, for the CLI run: 32 blocks of MLP 6656, SmolLM2's vocabulary.
CLI = {"num_hidden_layers": 32, "intermediate_size": 6656, "vocab_size": 49152}


def synthetic_checkpoint(
    path: str | os.PathLike,
    *,
    moe: bool = False,
    per_expert: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    tokenizer: str | os.PathLike | None = None,
    **sizes: int,
) -> int:
    """Writes a LlamaForCausalLM checkpoint (moe=True: a MixtralForCausalLM, its experts stored as the
    model's fused 3-D parameters, as `save_pretrained(save_original_format=False)` writes them, or with
    per_expert=True one tensor per expert, `block_sparse_moe.experts.<e>.w1/w2/w3.weight`, the hub's
    layout) with random weights (N(0, 0.02)) to the directory `path`: config.json, one shard per decoder block plus
    one for the rest, the index, and the tokenizer files of the model directory `tokenizer` if given (its
    vocabulary must fit `vocab_size`). Returns its size in bytes. `sizes`: config fields (default BIG or
    BIG_MOE). Memory: one block at a time (each expert drawn on its own)."""
    from transformers import LlamaConfig, MixtralConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    kind, defaults = (MixtralConfig, BIG_MOE) if moe else (LlamaConfig, BIG)
    config = kind(
        **{**defaults, **sizes}, tie_word_embeddings=False, architectures=[kind.__name__[:-6] + "ForCausalLM"]
    )
    config.save_pretrained(path)
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = h // config.num_attention_heads * config.num_key_value_heads
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    weight_map, total = {}, 0
    front = {
        "model.embed_tokens.weight": rand(config.vocab_size, h),
        "model.norm.weight": torch.ones(h, dtype=dtype),
        "lm_head.weight": rand(config.vocab_size, h),
    }
    shapes = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
    }
    if moe:
        shapes["mlp.gate"] = (config.num_local_experts, h)
    else:
        shapes.update({"mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)})
    for index in range(n + 1):
        if index == 0:
            tensors = front
        else:
            prefix = f"model.layers.{index - 1}."
            tensors = {f"{prefix}{name}.weight": rand(*shape) for name, shape in shapes.items()}
            if moe and per_expert:
                tensors[f"{prefix}block_sparse_moe.gate.weight"] = tensors.pop(f"{prefix}mlp.gate.weight")
                for e in range(config.num_local_experts):
                    for name, shape in (("w1", (i, h)), ("w3", (i, h)), ("w2", (h, i))):
                        tensors[f"{prefix}block_sparse_moe.experts.{e}.{name}.weight"] = rand(*shape)
            elif moe:
                experts = range(config.num_local_experts)
                tensors[f"{prefix}mlp.experts.gate_up_proj"] = torch.stack([rand(2 * i, h) for _ in experts])
                tensors[f"{prefix}mlp.experts.down_proj"] = torch.stack([rand(h, i) for _ in experts])
            tensors[f"{prefix}input_layernorm.weight"] = torch.ones(h, dtype=dtype)
            tensors[f"{prefix}post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
        shard = shard_name(index + 1, n + 1)
        write_shard(path / shard, tensors)
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    write_index(path, weight_map, total)
    for file in Path(tokenizer).glob("*token*") if tokenizer is not None else []:
        shutil.copyfile(file, path / file.name)
    return total


_CHILD = r"""
import json, resource, sys, time
import torch
from pyprune_fast import llm
path, out, mode, method, samples, seq_len = sys.argv[1:7]
vocab = json.load(open(f"{path}/config.json"))["vocab_size"]
calibration = torch.randint(0, vocab, (int(samples) * int(seq_len),), generator=torch.Generator().manual_seed(0))
options = dict(method=method, sparsity=0.5, num_samples=int(samples), seq_len=int(seq_len), progress=False)
start = time.perf_counter()
if mode == "disk":
    result = llm.prune(path, calibration, offload="disk", out=out, **options)
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", local_files_only=True)
    result = llm.prune(model, calibration, **options)
    llm.save_pretrained(model, None, out)
print(json.dumps({"seconds": time.perf_counter() - start, "block_seconds": result.block_seconds,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "sparsity": result.overall_sparsity}))
"""


def run_prune(path, out, mode: str, method: str = "wanda", samples: int = 4, seq_len: int = 128) -> dict:
    """Prunes the checkpoint at `path` into `out` in a fresh process — mode "disk" (offload="disk") or
    "memory" (from_pretrained, llm.prune, save_pretrained) — and returns {seconds, block_seconds,
    peak_rss_bytes, sparsity}."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(out), mode, method, str(samples), str(seq_len)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the {mode} run failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _peak_rss() -> int:
    """The process's peak resident memory since the last `_reset_peak` (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_peak() -> None:
    """Resets the peak resident memory to the current one (Linux ≥ 4.0: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


class Phases:
    """The peak RSS and the seconds of each phase of a run, phases nested: entering one closes the
    current segment of the enclosing phase (its peak so far read, the high-water mark reset), leaving
    it does the same for it. A phase's peak is the highest of its own segments (not its children's);
    its seconds exclude its children's. Linux only (/proc/self/status, /proc/self/clear_refs). With
    `record`, the table is written there after every phase (a run cut short keeps what it measured)."""

    def __init__(self, record: str | os.PathLike | None = None) -> None:
        self.record = record
        self.stack = ["startup"]
        self.peak: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self.since = time.perf_counter()

    def _close(self) -> None:
        name, now = self.stack[-1], time.perf_counter()
        self.peak[name] = max(self.peak.get(name, 0), _peak_rss())
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.since
        self.since = now
        if self.record is not None:
            Path(self.record).write_text(json.dumps({"phases": self._table()}, indent=1) + "\n")
        _reset_peak()

    @contextlib.contextmanager
    def phase(self, name: str):
        self._close()
        name = f"{self.stack[-1]} / {name}" if len(self.stack) > 1 else name
        self.count[name] = self.count.get(name, 0) + 1
        self.stack.append(name)
        try:
            yield
        finally:
            self._close()
            self.stack.pop()

    def switch(self, name: str) -> None:
        """Ends the outermost phase and starts `name` in its place."""
        self._close()
        self.stack[0] = name

    def wrap(self, owner, attribute: str, name, kind: str = "function") -> None:
        """Replaces owner.attribute — a function, a context manager (kind "context") or a generator
        function (kind "generator") — by one that runs in the phase `name` (a string, or a function of
        nothing returning one)."""
        original = getattr(owner, attribute)

        def named():
            return name() if callable(name) else name

        if kind == "context":

            @contextlib.contextmanager
            def wrapped(*args, **kwargs):
                with self.phase(named()), original(*args, **kwargs) as value:
                    yield value
        elif kind == "generator":

            def wrapped(*args, **kwargs):
                with self.phase(named()):
                    yield from original(*args, **kwargs)
        else:

            def wrapped(*args, **kwargs):
                with self.phase(named()):
                    return original(*args, **kwargs)

        setattr(owner, attribute, functools.wraps(original)(wrapped))

    def table(self) -> dict:
        """{phase: {peak_rss_bytes, seconds, count}}, the phase under way closed first."""
        self._close()
        return self._table()

    def _table(self) -> dict:
        return {n: {"peak_rss_bytes": self.peak[n], "seconds": self.seconds[n], "count": self.count.get(n, 1)}
                for n in self.peak}  # fmt: skip


def _instrument(phases: Phases) -> None:
    """Names the phases of `pyprune-fast prune --offload disk` (the functions they run in)."""
    from .. import llm
    from ..app import llm_runner
    from ..app.cli import reports
    from ..llm import offload

    pruned, original = [], llm.prune

    def evaluation() -> str:
        return "evaluation (pruned)" if pruned else "evaluation (dense)"

    def prune(*args, **kwargs):
        pruned.append(True)
        return original(*args, **kwargs)

    llm.prune = functools.wraps(original)(prune)
    phases.wrap(llm, "prune", "prune")
    phases.wrap(reports, "load", "load (skeleton, tokenizer, text)")
    phases.wrap(offload.DiskStore, "front", "embeddings", kind="context")
    phases.wrap(offload.DiskStore, "block", "block", kind="context")
    phases.wrap(offload.DiskStore, "finish", "index and side files")
    phases.wrap(offload.DiskStore, "logits", evaluation, kind="generator")
    phases.wrap(offload.DiskStore, "_head", "head and logits", kind="generator")
    phases.wrap(offload, "write_shard", "write shard")
    run = llm_runner.prune_offloaded

    def then_report(*args, **kwargs):
        value = run(*args, **kwargs)
        phases.switch("report")
        return value

    llm_runner.prune_offloaded = then_report


def cli_child(argv: list[str]) -> None:
    """The child process of `run_cli`: argv = [phases JSON file, the CLI's arguments...]."""
    from ..app.cli import main

    phases = Phases(argv[0])
    _instrument(phases)
    code = main(argv[1:])
    table = phases.table()
    Path(argv[0]).write_text(json.dumps({"exit": code, "phases": table}, indent=1) + "\n")


def run_cli(path, out, *args: str, threads: int = 1) -> dict:
    """Runs `pyprune-fast prune --model hf:<path> --offload disk --out <out> <args>` in a fresh process
    with `threads` threads and returns {exit, phases: {name: {peak_rss_bytes, seconds, count}},
    seconds, peak_rss_bytes (the highest phase peak)}."""
    record = Path(out).with_suffix(".phases.json")
    argv = ["prune", "--model", f"hf:{path}", "--offload", "disk", "--out", str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from pyprune_fast.bench.offload import cli_child; cli_child(sys.argv[1:])",
         str(record), *argv],
        capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the CLI run failed: {done.stderr[-2000:]}")
    result = json.loads(record.read_text())
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_bytes"] = max(p["peak_rss_bytes"] for p in result["phases"].values())
    result["stdout"] = done.stdout
    return result
