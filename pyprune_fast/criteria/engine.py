"""The criterion job every criterion shares: its resolved arguments (model, batches, scored
parameters, loss, forward, ranks), the checks of those arguments, gradients of an objective and L_p
normalization. Selecting parameters and layers, batches, hooks and preserving the model's state are
model utilities (pyprune_fast.modeling)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import Communicator
from ..modeling import (
    LayerSelector,
    ParamSelector,
    channel_layers,
    first_tensor,
    select_layers,
    select_params,
    split_batch,
    to_device,
)
from .backward import check_objective

Forward = Callable[[nn.Module, Any], Any]


def default_loss(outputs: Any, targets: Any) -> Tensor:
    """Cross-entropy for integer class targets; any other target needs an explicit loss_fn."""
    if isinstance(targets, Tensor) and not targets.is_floating_point():
        return nn.functional.cross_entropy(first_tensor(outputs).float(), targets)
    raise ValueError(
        "this criterion needs a loss: pass loss_fn=(outputs, targets) -> scalar "
        "(the default, cross-entropy, needs integer class targets)"
    )


@dataclass
class Job:
    """Everything a criterion needs, resolved from its keyword arguments."""

    model: nn.Module
    data: Iterable | None
    params: dict[str, nn.Parameter]
    loss_fn: Callable[[Any, Any], Tensor] | None = None
    layers_arg: LayerSelector = None
    num_batches: int | None = None
    forward: Forward | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    comm: Communicator | None = None
    reduced: bool = False

    @property
    def names(self) -> list[str]:
        return list(self.params)

    @property
    def tensors(self) -> list[nn.Parameter]:
        return list(self.params.values())

    def layers(self) -> dict[str, nn.Module]:
        return select_layers(self.model, self.layers_arg, self.params)

    def batches(self) -> Iterator[tuple[Any, Any]]:
        """(inputs, targets) on the model's device, at most num_batches of them, at least one."""
        if self.data is None:
            raise ValueError("this criterion needs data: an iterable of (inputs, targets) batches")
        count = 0
        for batch in self.data:
            if self.num_batches is not None and count >= self.num_batches:
                break
            inputs, targets = split_batch(batch)
            yield to_device(inputs, self.device), to_device(targets, self.device)
            count += 1
        if count == 0:
            raise ValueError("data yielded no batches")

    def run(self, inputs: Any) -> Any:
        return self.forward(self.model, inputs) if self.forward is not None else self.model(inputs)

    def loss(self, outputs: Any, targets: Any) -> Tensor:
        return (self.loss_fn or default_loss)(outputs, targets)

    def reduce(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Σ over the ranks of `group=` of each tensor, in place (data-parallel calibration: each rank's
        sums over its own batches become the sums over all batches); the tensors unchanged without a
        group. Every criterion that sums over batches calls it on its sums before forming scores."""
        self.reduced = True
        tensors = list(tensors)
        return tensors if self.comm is None else self.comm.all_reduce_sum_(tensors)

    def scores(self, values: Sequence[Tensor]) -> dict[str, Tensor]:
        return {n: v.float() for n, v in zip(self.names, values)}


def check_num_batches(num_batches: object) -> int | None:
    """num_batches as an int >= 1, or None (every batch): TypeError for a non-integer (2.5, True),
    ValueError below 1."""
    if num_batches is None:
        return None
    if isinstance(num_batches, bool) or not isinstance(num_batches, numbers.Integral):
        raise TypeError(f"num_batches must be a positive int or None, got {num_batches!r}")
    if num_batches < 1:
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    return int(num_batches)


def require_reiterable(data: Iterable | None, who: str, passes: str) -> None:
    """ValueError when a criterion that passes over `data` twice is given a one-shot iterator or
    generator (`iter(data) is data`): its second pass would see other batches, or none."""
    if data is not None and iter(data) is data:
        raise ValueError(
            f"{who} passes over data twice ({passes}), so data must be re-iterable: pass a list of batches or a "
            f"DataLoader, not a {type(data).__name__} (an iterator or generator is used up by the first pass; "
            "list(data) keeps its batches)"
        )


def make_job(
    model: nn.Module,
    data: Iterable | None,
    *,
    loss_fn=None,
    params: ParamSelector = None,
    layers: LayerSelector = None,
    num_batches: int | None = None,
    forward: Forward | None = None,
    comm: Communicator | None = None,
    selected: dict[str, nn.Parameter] | None = None,
) -> Job:
    """A Job over the parameters `params=` selects (`select_params`), or over `selected`, parameters
    already chosen by name (then params must be None)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (outputs, targets) -> scalar, got {type(loss_fn).__name__}")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable (model, inputs) -> outputs, got {type(forward).__name__}")
    num_batches = check_num_batches(num_batches)
    if selected is None:
        selected = select_params(model, params)
    elif params is not None:
        raise ValueError("make_job takes params= or selected=, not both")
    elif not selected:
        raise ValueError("selected= must name at least one parameter")
    device = next(iter(selected.values())).device
    return Job(model, data, selected, loss_fn, layers, num_batches, forward, device, comm)


def check_normalize(normalize: str | None, p: float) -> None:
    if normalize not in (None, "lp"):
        raise ValueError(f"normalize must be None or 'lp', got {normalize!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
        raise ValueError(f"p must be a finite number > 0, got {p!r}")


def lp_normalize(score: Tensor, p: float) -> Tensor:
    """√S / ‖√S‖_p over one layer's channels, ‖v‖_p = (Σ_c |v_c|^p)^(1/p) (0 where the norm is 0):
    eq. 4.13 of Ide's thesis (see criteria.channel)."""
    root = score.double().sqrt()
    norm = root.pow(p).sum().pow(1.0 / p)
    return torch.where(norm > 0, root / norm, torch.zeros_like(root))


@dataclass
class ChannelRequest:
    """A channel criterion's resolved arguments: the layers to score (`explicit` when the user chose
    them) and a Job over their weights for the batches, the loss and the forward."""

    model: nn.Module
    layers: dict[str, nn.Module]
    explicit: bool
    job: Job

    @property
    def data(self) -> Iterable | None:
        return self.job.data

    def check_seen(self, seen: Iterable[str]) -> None:
        seen = set(seen)
        missing = [n for n in self.layers if n not in seen]
        if missing and self.explicit:
            raise ValueError(f"these layers produced no output in the forward pass: {missing}")
        if len(missing) == len(self.layers):
            raise ValueError("none of the scored layers was called in the forward pass")


def make_channel_request(
    model: nn.Module,
    data: Iterable | None,
    *,
    params: ParamSelector = None,
    layers: LayerSelector = None,
    normalize: str | None = None,
    p: float = 1.0,
    **job_options,
) -> ChannelRequest:
    """The layers a channel criterion scores (`channel_layers`) and a Job over their weights with the
    other shared arguments (loss_fn, num_batches, forward)."""
    check_normalize(normalize, p)
    chosen = channel_layers(model, layers, params)
    weights, seen = {}, set()  # each layer's weight, a shared one once
    for name, module in chosen.items():
        if isinstance(module.weight, nn.Parameter) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            weights[f"{name}.weight" if name else "weight"] = module.weight
    if not weights:
        raise ValueError("none of the chosen layers has its weight as a Parameter to score")
    job = make_job(model, data, selected=weights, **job_options)
    return ChannelRequest(model, chosen, layers is not None or params is not None, job)


def grads_of(
    objective: Tensor, params: Sequence[Tensor], *, retain_graph: bool | None = None, create_graph: bool = False
) -> list[Tensor]:
    """∂objective/∂p for each p; zeros for parameters the objective does not reach."""
    grads = torch.autograd.grad(
        check_objective(objective),
        list(params),
        retain_graph=retain_graph,
        create_graph=create_graph,
        allow_unused=True,
    )
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def as_float32(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The tensors in float32 (the same tensors when they already are)."""
    return [t.detach() if t.dtype == torch.float32 else t.detach().float() for t in tensors]
