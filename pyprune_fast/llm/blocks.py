"""The blocks of a transformer, found generically, and the calibration inputs of the first one.

Blocks: the model's `nn.ModuleList` (or `nn.Sequential`) of identical modules that hold Linear layers
(Llama/Mistral/Qwen2 `model.layers`, GPT-NeoX `gpt_neox.layers`, OPT `model.decoder.layers`, BERT and
Hugging Face ViT/DINOv2/CLIP `encoder.layer(s)`, timm `blocks`, torchvision ViT `encoder.layers`, ...);
among several such lists, the one with the most parameters. Inputs: a forward pre-hook (with kwargs) on block 0 records
exactly what the model passes to it — hidden states, attention mask, position ids, rotary position
embeddings, cache position, whatever the architecture uses — and raises a sentinel to stop the forward
there, so nothing is rebuilt per architecture and nothing past the first block runs.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..modeling import first_tensor, split_batch, to_device
from .moe import with_experts


def _holds_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules() if m is not module)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The blocks of a transformer: the ModuleList or Sequential of same-class modules holding nn.Linear
    layers with the most parameters. ValueError when there is none.

    Args:
        model: any nn.Module.

    Returns:
        (name, blocks): the blocks' qualified name (`model.layers`) and the container."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or not all(_holds_linear(child) for child in module):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ValueError(
            f"found no decoder blocks in {type(model).__name__}: expected an nn.ModuleList (or nn.Sequential) of "
            "identical modules that contain nn.Linear layers (the model's decoder or encoder layers)"
        )
    return best[1], best[2]


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The nn.Linear layers of one block, by name relative to the block, in `named_modules()` order; in a
    mixture-of-experts block without its routers' Linears, followed by each routed expert's Linears as
    views of the fused expert tensors (llm.moe.with_experts)."""
    return with_experts(block, {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)})


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); CPU for a module that holds neither."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device) -> Iterator[None]:
    """The module on `device` for the duration, then back where it was."""
    home = module_device(module)
    module.to(device)
    try:
        yield
    finally:
        module.to(home)


class _Stop(Exception):
    """Raised by the capture hook to end the model's forward at the first decoder block."""


def _same(a: Any, b: Any) -> bool:
    """Whether two captured keyword values are equal (tensors: same shape, dtype and values)."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return False
    try:
        return bool(a == b) if type(a) is type(b) else False
    except (TypeError, ValueError, RuntimeError):
        return a is b


@dataclass
class BlockInputs:
    """The calibration inputs of a decoder block, batch by batch: `hidden[j]` [b, T, H] and the other
    positional (`args[j]`) and keyword (`kwargs[j]`) arguments the model passed with it. Keyword
    values equal to the previous batch's are shared, so a mask or position embedding common to every
    batch is stored once. The hidden states are replaced by each block's outputs as the pipeline goes."""

    hidden: list[Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    by_keyword: bool = False

    def __len__(self) -> int:
        return len(self.hidden)

    def add(self, args: tuple, kwargs: dict[str, Any], device: torch.device) -> None:
        kwargs = dict(kwargs)
        if args:
            hidden, args = args[0], tuple(args[1:])
        elif "hidden_states" in kwargs:
            hidden, self.by_keyword = kwargs.pop("hidden_states"), True
        else:
            raise ValueError("the first decoder block was called without hidden states (no positional argument)")
        args, kwargs = to_device(args, device), to_device(kwargs, device)
        if self.kwargs:
            previous = self.kwargs[-1]
            kwargs = {k: previous[k] if k in previous and _same(v, previous[k]) else v for k, v in kwargs.items()}
        self.hidden.append(hidden.detach().to(device))
        self.args.append(args)
        self.kwargs.append(kwargs)

    def call(self, j: int) -> tuple[tuple, dict[str, Any]]:
        """(args, kwargs) of the block's call on batch j."""
        if self.by_keyword:
            return self.args[j], {**self.kwargs[j], "hidden_states": self.hidden[j]}
        return (self.hidden[j], *self.args[j]), self.kwargs[j]

    def run(self, block: nn.Module, j: int) -> Tensor:
        """The block's output hidden states for batch j."""
        args, kwargs = self.call(j)
        return first_tensor(block(*args, **kwargs))

    def advance(self, block: nn.Module) -> None:
        """Replaces each batch's hidden states by the block's outputs: the next block's inputs."""
        for j in range(len(self)):
            self.hidden[j] = self.run(block, j)

    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)


def accepts(model: nn.Module, name: str) -> bool:
    """Whether the model's forward takes a keyword argument `name`."""
    params = inspect.signature(model.forward).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def input_device(model: nn.Module) -> torch.device:
    """Where the model wants its token ids: its input embedding's device when it has one."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return module_device(embeddings) if isinstance(embeddings, nn.Module) else module_device(model)


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    first_block: nn.Module,
    token_batches: Iterable[Any],
    device: torch.device,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> BlockInputs:
    """Runs the model on each batch up to its first block, whose every argument is recorded (moved to
    `device`) and the forward stopped there.

    Args:
        model: the model; first_block: its first block (`find_blocks(model)[1][0]`).
        token_batches: batches of token ids [b, T] (run without a KV cache), or with `forward` any
            inputs of the model: an `(inputs, targets)` pair or bare inputs.
        device: where the captured arguments go.
        forward: a callable (model, inputs), as the criteria API's.

    Returns:
        BlockInputs: per batch, the hidden states and every other argument of the first block's call."""
    captured = BlockInputs()
    extra = {"use_cache": False} if accepts(model, "use_cache") else {}
    where = input_device(model)

    def run(batch: Any) -> None:
        if forward is None:
            model(input_ids=batch.to(where), **extra)
        else:
            forward(model, to_device(split_batch(batch)[0], where))

    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        captured.add(args, kwargs, device)
        raise _Stop

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in token_batches:
            try:
                run(batch)
            except _Stop:
                continue
            raise RuntimeError("the model's forward returned without calling its first block")
    finally:
        handle.remove()
    return captured
