"""Model utilities every path shares (criteria, the block pipeline, the application, schedules,
integrations, benchmarks): which parameters and layers are scored, batches and devices, the tensor of a
module's output, hooks on layer inputs and outputs, and putting a model's modes and flags back exactly
as they were — each written once here."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

ParamSelector = Sequence[str] | Callable[[str, nn.Parameter], bool] | None
LayerSelector = Sequence[str] | Sequence[type] | type | tuple[type, ...] | None

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


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the duration; then every module's training flag is put back (only
    the flags eval() changed are written: nn.Module.__setattr__ per module is slow on large models)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        if any(training for _, training in modes):
            model.eval()
        yield
    finally:
        for m, training in modes:
            if m.training != training:
                m.training = training


@contextlib.contextmanager
def preserved(model: nn.Module, params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Eval mode, gradients enabled, requires_grad switched on for the scored parameters; then every
    module's training flag and every parameter's requires_grad are put back. The other parameters
    keep the requires_grad the user gave them: switching them off changes the forward itself (a
    torchvision ViT's attention in-projection, a bare Parameter that is not scored by default, then
    runs as a batched matmul instead of the folded one), and the backward passes reach only the scored
    parameters anyway (`torch.autograd.grad` or `backward(inputs=...)`). `.grad` is never left
    changed; our hooks are removed by their own contexts."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with eval_mode(model):
            for p in params:
                if not p.requires_grad:
                    p.requires_grad_(True)
            with torch.enable_grad():
                yield
    finally:
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


@contextlib.contextmanager
def restored(model: nn.Module, names: Iterable[str] | None = None) -> Iterator[None]:
    """The model's parameters and buffers (or only the parameters and buffers `names` lists) copied
    and put back bit for bit on exit, whatever happened inside: for runs that prune a model to measure
    it and must hand the dense model back."""
    state = model.state_dict(keep_vars=True)
    if names is not None:
        wanted = list(names)
        unknown = [n for n in wanted if n not in state]
        if unknown:
            raise ValueError(f"names not in the model's state_dict(): {unknown}")
        state = {n: state[n] for n in wanted}
    saved = {k: v.detach().clone() for k, v in state.items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in state.items():
                v.copy_(saved[k])


def _view_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An nn.Linear whose weight (and bias) are Parameters on the storage of the given slices: writes to
    the Linear's weight (pruning in place) are writes to the tensor the slices come from."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
    return linear


class UnpackedAttention(nn.Module):
    """nn.MultiheadAttention as separate q_proj, k_proj, v_proj Linears (views of its packed
    in_proj_weight and in_proj_bias: pruning one prunes the packed weight in place) and its own out_proj,
    each called as a module so that hooks see their inputs and outputs. The same attention up to float
    rounding (three products instead of one), in eval mode; masks and attention dropout are refused."""

    def __init__(self, attention: nn.MultiheadAttention, name: str) -> None:
        super().__init__()
        packed = attention.in_proj_weight is not None and attention.kdim == attention.vdim == attention.embed_dim
        if not packed or attention.bias_k is not None or attention.add_zero_attn:
            raise ValueError(
                f"{name}: an nn.MultiheadAttention with separate kdim/vdim, bias_k/bias_v or add_zero_attn is not "
                "supported by the block pipeline (its packed in_proj_weight would not be pruned)"
            )
        e, weight, bias = attention.embed_dim, attention.in_proj_weight, attention.in_proj_bias
        for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = slice(i * e, (i + 1) * e)
            setattr(self, proj, _view_linear(weight[rows], None if bias is None else bias[rows]))
        self.out_proj = attention.out_proj
        self.heads, self.batch_first, self.name = attention.num_heads, attention.batch_first, name

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise ValueError(f"{self.name}: attention masks are not supported by the block pipeline's unpacking")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, t, e = query.shape
        h = self.heads

        def split(x: Tensor) -> Tensor:
            return x.reshape(b, -1, h, e // h).transpose(1, 2)

        q, k, v = split(self.q_proj(query)), split(self.k_proj(key)), split(self.v_proj(value))
        weights = None
        if need_weights:
            attn = torch.softmax((q @ k.transpose(-2, -1)) * (e // h) ** -0.5, dim=-1)
            out = attn @ v
            weights = attn.mean(1) if average_attn_weights else attn
        else:
            out = nn.functional.scaled_dot_product_attention(q, k, v)
        out = self.out_proj(out.transpose(1, 2).reshape(b, t, e))
        return (out if self.batch_first else out.transpose(0, 1)), weights


@contextlib.contextmanager
def unpacked_attention(model: nn.Module) -> Iterator[None]:
    """Every nn.MultiheadAttention of the model replaced by its UnpackedAttention for the duration (so that
    its q/k/v/out projections are four Linears of the block, pruned in place through views of the packed
    weight), then put back. ValueError, with the model unchanged, for an attention it cannot unpack."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if not found:
        yield
        return
    replacements = [UnpackedAttention(m, n) for n, m in found]
    parents = []
    for (name, attention), unpacked in zip(found, replacements):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parents.append((parent, child, attention))
        setattr(parent, child, unpacked)
    try:
        yield
    finally:
        for parent, child, attention in parents:
            setattr(parent, child, attention)
