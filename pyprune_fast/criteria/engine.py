"""The one engine every criterion shares: choosing parameters and layers, iterating batches,
collecting features, summing gradients over batches, and giving the model back exactly as it was."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import Communicator
from .backward import check_objective

ParamSelector = Sequence[str] | Callable[[str, nn.Parameter], bool] | None
LayerSelector = Sequence[str] | Sequence[type] | type | tuple[type, ...] | None
Forward = Callable[[nn.Module, Any], Any]

PRUNABLE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def default_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights of every Linear and Conv1d/2d/3d by name, in `named_parameters()` order and under
    the names it gives them (a weight tied to an earlier module's parameter is named after that one),
    read in one walk over the modules."""
    named: dict[int, tuple[str, nn.Parameter]] = {}
    owned: set[int] = set()
    for prefix, module in model.named_modules():
        for key, p in module._parameters.items():
            if p is not None and id(p) not in named:
                named[id(p)] = (f"{prefix}.{key}" if prefix else key, p)
        if isinstance(module, PRUNABLE_MODULES) and isinstance(module.weight, nn.Parameter):
            owned.add(id(module.weight))
    return {name: p for i, (name, p) in named.items() if i in owned}


def default_param_names(model: nn.Module) -> list[str]:
    """Names of the weights of every Linear and Conv1d/2d/3d, in `named_parameters()` order."""
    return list(default_params(model))


def select_params(model: nn.Module, params: ParamSelector) -> dict[str, nn.Parameter]:
    """The scored parameters by name: the default weights, the given names, or those a predicate accepts."""
    if params is None:
        named = default_params(model)
        names = list(named)
    else:
        named = dict(model.named_parameters())
        if callable(params):
            names = [n for n, p in named.items() if params(n, p)]
        elif isinstance(params, str):
            raise TypeError("params must be a list of parameter names or a predicate (name, param) -> bool, got a str")
        else:
            names = list(params)
            unknown = [n for n in names if n not in named]
            if unknown:
                raise ValueError(f"params names not in model.named_parameters(): {unknown}")
    if not names:
        raise ValueError(
            "no parameters selected for scoring (params= selected nothing, or the model has no Linear/Conv)"
        )
    return {n: named[n] for n in names}


def owner_modules(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, nn.Module]:
    """Modules that directly own one of the scored parameters, in `named_modules()` order."""
    ids = {id(p) for p in params.values()}
    return {name: m for name, m in model.named_modules() if any(id(p) in ids for p in m.parameters(recurse=False))}


def select_layers(model: nn.Module, layers: LayerSelector, params: dict[str, nn.Parameter]) -> dict[str, nn.Module]:
    """Layers whose outputs are the features F^l: owners of scored weights by default, else by name or type."""
    if layers is None:
        chosen = owner_modules(model, params)
    else:
        if isinstance(layers, type) or (
            isinstance(layers, tuple) and layers and all(isinstance(t, type) for t in layers)
        ):
            layers = [layers] if isinstance(layers, type) else list(layers)
        items = list(layers)
        modules = dict(model.named_modules())
        if all(isinstance(x, type) for x in items):
            chosen = {n: m for n, m in modules.items() if isinstance(m, tuple(items))}
        elif all(isinstance(x, str) for x in items):
            unknown = [n for n in items if n not in modules]
            if unknown:
                raise ValueError(f"layers names not in model.named_modules(): {unknown}")
            chosen = {n: modules[n] for n in items}
        else:
            raise TypeError("layers must be a list of module names or of module types")
    if not chosen:
        raise ValueError("no layers selected for the feature objective (layers= selected nothing)")
    return chosen


def first_tensor(value: Any) -> Tensor:
    """The tensor of a module output: itself, or the first tensor of a tuple/list/dict/ModelOutput."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, Tensor):
                return v
    raise TypeError(f"expected a Tensor output (or a tuple/dict holding one), got {type(value).__name__}")


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return type(value)({k: to_device(v, device) for k, v in value.items()})
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(to_device(v, device) for v in value)
    return value


def split_batch(batch: Any) -> tuple[Any, Any]:
    """A batch is `(inputs, targets)`; a bare tensor or dict is inputs without targets."""
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


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


def out_channels(module: nn.Module) -> int:
    """The number of output channels of a Linear (out_features) or Conv (out_channels)."""
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def channel_layers(model: nn.Module, layers: LayerSelector, params: ParamSelector = None) -> dict[str, nn.Module]:
    """The layers a channel criterion scores: every Conv/Linear by default; else those named or typed
    by `layers=`, or the owners of the weights chosen by `params=`; all must be Conv/Linear."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if layers is not None and params is not None:
        raise ValueError("pass layers= or params= to choose the scored layers of a channel criterion, not both")
    if layers is None and params is None:
        chosen = {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE_MODULES)}
        if not chosen:
            raise ValueError("the model has no Conv1d/2d/3d or Linear layer to score")
        return chosen
    if params is not None:
        chosen = owner_modules(model, select_params(model, params))
    else:
        chosen = select_layers(model, layers, {})
    wrong = [n for n, m in chosen.items() if not isinstance(m, PRUNABLE_MODULES)]
    if wrong:
        raise ValueError(f"layers must be Conv1d/2d/3d or Linear modules; these are not: {wrong}")
    return chosen


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


@contextlib.contextmanager
def preserved(model: nn.Module, params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Eval mode, gradients enabled, requires_grad switched on for the scored parameters; then every
    module's training flag and every parameter's requires_grad are put back. The other parameters
    keep the requires_grad the user gave them: switching them off changes the forward itself (a
    torchvision ViT's attention in-projection, a bare Parameter that is not scored by default, then
    runs as a batched matmul 4x slower than the folded one on CPU), and the backward passes reach only
    the scored parameters anyway (`torch.autograd.grad` or `backward(inputs=...)`). `.grad` is never
    left changed; our hooks are removed by their own contexts."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if any(training for _, training in modes):
            model.eval()
        for p in params:
            if not p.requires_grad:
                p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for m, training in modes:
            if m.training != training:  # nn.Module.__setattr__ is slow: only the flags eval() changed
                m.training = training
        for p, flag in flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)


class _Identity(nn.Module):
    """Stands in for an attention block's out_proj: weight = I, bias = 0, so the block returns the
    attention output before projection."""

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        eye = torch.eye(proj.in_features, dtype=proj.weight.dtype, device=proj.weight.device)
        self.weight = eye
        self.bias = None if proj.bias is None else torch.zeros_like(proj.bias.detach())


@contextlib.contextmanager
def observable_attention(model: nn.Module) -> Iterator[None]:
    """nn.MultiheadAttention applies out_proj's weight functionally, so no hook sees out_proj's input
    or output. Inside this context each attention block computes with an identity projection and its
    real out_proj is then called as a module on the result: the same values, and out_proj's hooks
    (inputs for Wanda, outputs for the feature criteria) fire like any Linear's."""
    blocks = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    handles, real = [], []
    for block in blocks:
        proj = block.out_proj
        real.append(proj)

        def project(_module, _args, output, proj=proj):
            return (proj(output[0]), *output[1:])

        block.out_proj = _Identity(proj)
        handles.append(block.register_forward_hook(project))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for block, proj in zip(blocks, real):
            block.out_proj = proj


@contextlib.contextmanager
def capture_outputs(layers: dict[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    """Forward hooks that record each layer's latest output tensor (with its autograd graph)."""
    seen: dict[str, Tensor] = {}
    with on_outputs(layers, seen.__setitem__):
        yield seen


@contextlib.contextmanager
def on_outputs(layers: dict[str, nn.Module], on_output: Callable[[str, Tensor], Tensor | None]) -> Iterator[None]:
    """Forward hooks that pass each layer's output tensor (`first_tensor`) to `on_output(name, y)`; a
    tensor it returns takes y's place in the layer's output (the output itself, or that element of a
    tuple or list)."""
    handles = []
    for name, module in layers.items():

        def hook(_module, _args, output, name=name):
            y = first_tensor(output)
            replacement = on_output(name, y)
            if replacement is None or isinstance(output, Tensor):
                return replacement
            if isinstance(output, (tuple, list)):
                return type(output)(replacement if v is y else v for v in output)
            raise TypeError(f"{name}: cannot replace the tensor inside a {type(output).__name__} output")

        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture_inputs(layers: dict[str, nn.Module], on_input: Callable[[str, Tensor], None]) -> Iterator[None]:
    """Forward pre-hooks that pass each layer's input tensor to `on_input(name, x)`."""
    handles = []
    for name, module in layers.items():

        def hook(_module, args, name=name):
            on_input(name, first_tensor(args))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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
