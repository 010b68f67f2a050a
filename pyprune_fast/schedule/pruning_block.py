"""The Pruning Block (Ide's thesis, ch. 4.4): channels learned off by gates on a compressed feature map.

After each chosen layer L (Conv2d or Linear, C output channels) the block computes

    y = D · a(h_σ(m) ⊙ E · L(x))

E: a 1×1 projection C → C' (the encoder), m ∈ R^{C'}: auxiliary variables, h_σ: a smooth step that
turns each m_c into a gate in [0, 1], a: the activation that followed L, D: a 1×1 projection C' → C
(the decoder). E and D are bias-free linear maps. The continuous-gate baseline the chapter compares
against has no E and no D: y = a(h_σ(m) ⊙ L(x)), one gate per channel of L.

Gate: h_σ(m) = clamp(m/σ + 1/2, 0, 1), the hard sigmoid (default), written as relu(u) − relu(u − 1)
with u = m/σ + 1/2 so that a gate at exactly 1 still has a gradient and a gate at exactly 0 has none
(once off, it stays off). `gate="sigmoid"`: h_σ(m) = sigmoid(m/σ), never exactly 0 or 1. The
auxiliary variables start at m = σ/2 (hard sigmoid: every gate exactly 1) or m = 2σ (sigmoid: 0.88).

Training (eqs. 4.24–4.29): the weights W (every other parameter of the model, E and D included) and
the auxiliary variables M are updated alternately, each with its own optimizer:

    W ← step of ∇_W L(W, M)                   M ← step of ∇_M [L(W, M) + λ R(M)]
    R(M) = Σ_l Σ_c h_σ(m_c^l) / C^l            (C^l: the number of gates of block l)

What R(M) can decide: the gate multiplies the pre-activation, so the loss is unchanged under
h_c → t·h_c with row c of E divided by t (in the baseline: row c of L with its bias, or the
BatchNorm's γ_c and β_c), for every t > 0 and any activation; for positively homogeneous ones (ReLU,
LeakyReLU) also with column c of what follows (D, or the next layer) divided by t. min_W L(W, M)
therefore does not depend on the value of a live gate: λR lowers every live gate while the weight
steps make up for it, so live gates drift down for as long as λ > 0, and which gates reach 0 is
decided by the race between the two steps, not by the objective. A channel that is identically zero
on the data has no loss gradient and goes first. Of two identical channels, L + λR takes the same
value whichever twin carries the pair's contribution (R is linear in the gates, the weights are
free), so only the race picks one: the twin with the higher gate gets the larger gradient on its
outgoing weights (∝ h_c for ReLU), takes over the pair's contribution, and the other gate falls to 0.
That needs λ/C above the gradient that the fitting error puts on a gate (else both twins stay at 1),
and it leaves the kept gates drifting, the faster the quicker the weight step makes up for them. On
the duplicate toy of the tests (baseline, ten seeds, Adam(lr=2e-2) on M): λ = 0.01, 120 steps (the
settings that find dead channels): no seed; λ = 3, 800 steps, one twin of each pair exactly 0 and the
other on in 9 of 10 with SGD(lr=0.05), SGD(lr=0.1) or Adam(lr=1e-2) on W, the kept gates then near
0.3, 0.22 and 0.15 and still falling. So with the hard sigmoid take "off" as "exactly 0" (a threshold
just above 0), end the gate phase when "on" in the history has settled, and fine-tune the folded
network. With the encoder no setting we tried gave 4 channels on and a matching fold: E, a full
C'×C matrix, makes up for every gate at once. Weight decay ω in the W step would make the objective
decide (a contribution p then costs at least 2√(λωp/C), at h = √(ωpC/λ), concave in p, so one twin
is cheaper than two), but only while that h is below 1, and in our runs it did not make the toy
reliable.

Folding: a gate below `threshold` switches its channel off. The gates that stay are multiplied into
the rows of E (before the activation, so exact for any activation), E into L (no nonlinearity
between them), and D into the next layer when it is a Conv2d/Linear of the same kind directly after
the block in an nn.Sequential (D is linear, bias-free, so zero padding of that layer stays exact).
The result is a plain network with k = #{c : h_σ(m_c) ≥ threshold} channels where L's output used to
be: L' (C_in → k), a, N' (k → C_out of N). Its outputs equal those of the gated network with the
gates below the threshold set to 0 — with the hard sigmoid, gates trained off are exactly 0, so then
the gated network itself. Where no next layer can take D, D stays as an explicit 1×1 projection
(k → C) after the activation; in the baseline without a next layer, L keeps its C channels with the
pruned rows zeroed (the report's "kept" is the mask).

The block takes over the activation that follows L when L sits in an nn.Sequential and the next
module is one of ACTIVATIONS (its slot becomes nn.Identity until `remove` or `fold`); otherwise a is
the identity. Activations must map 0 to 0 (all of ACTIVATIONS do), so that a channel off gives 0.
A BatchNorm between L and the activation (BatchNorm2d after a Conv2d, BatchNorm1d after a Linear,
over L's C channels, with running statistics) is taken over the same way: the block computes
E · BN(L(x)), so the gates act after the normalization and a channel off gives exactly 0 (gating
before BN would not: BN maps a zero channel to β). `fold` multiplies BN's eval-mode affine map
z ↦ (z − μ)·γ/√(σ² + ε) + β into L's rows and bias first; the folded network equals the gated one
in eval mode (in train mode BN normalizes with the batch's statistics, which no fixed layer can).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GATES = ("hard_sigmoid", "sigmoid")
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.ELU, nn.Hardswish, nn.Mish)
LAYERS = (nn.Conv2d, nn.Linear)
NORMS = {nn.Conv2d: nn.BatchNorm2d, nn.Linear: nn.BatchNorm1d}

__all__ = [
    "ACTIVATIONS",
    "GATES",
    "Inserted",
    "PruningBlock",
    "blocks",
    "fold",
    "gate_value",
    "insert",
    "masks",
    "regularizer",
    "train",
]


def gate_value(m: Tensor, gate: str = "hard_sigmoid", sigma: float = 1.0) -> Tensor:
    """h_σ(m): the hard sigmoid clamp(m/σ + 1/2, 0, 1) or the sigmoid sigmoid(m/σ) (see the module).

    Args:
        m: the auxiliary variables.
        gate: "hard_sigmoid" or "sigmoid".
        sigma: σ, the step's width.

    Returns:
        The gates, in [0, 1].
    """
    if gate == "hard_sigmoid":
        u = m / sigma + 0.5
        return F.relu(u) - F.relu(u - 1.0)
    if gate == "sigmoid":
        return torch.sigmoid(m / sigma)
    raise ValueError(f"gate must be one of {GATES}, got {gate!r}")


def _channels(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def _projection(layer: nn.Module, weight: Tensor) -> nn.Module:
    """A bias-free 1×1 projection of the kind of `layer` (Conv2d 1×1 or Linear) holding `weight` (out, in)."""
    out, inp = weight.shape
    kw = {"device": weight.device, "dtype": weight.dtype}
    if isinstance(layer, nn.Conv2d):
        proj = nn.Conv2d(inp, out, 1, bias=False, **kw)
    else:
        proj = nn.Linear(inp, out, bias=False, **kw)
    with torch.no_grad():
        proj.weight.copy_(weight.reshape(proj.weight.shape))
    return proj


class PruningBlock(nn.Module):
    """`layer` [→ `norm`] followed by [encoder C → width] → gates h_σ(m) → activation → [decoder width → C];
    with `width=None` the continuous-gate baseline (no encoder, no decoder, one gate per channel of
    `layer`). `norm`: the BatchNorm over the layer's C channels that followed it, or None. E and D start
    as identities when width = C, otherwise as E = Qᵀ, D = Q with Q (C, width) having orthonormal
    columns (drawn from the default generator).

    Args:
        layer: the Conv2d/Linear the block follows (and holds).
        width: C', the compressed width; None: the continuous-gate baseline.
        activation: the activation that followed the layer.
        gate, sigma: as gate_value's.
        norm: the BatchNorm that followed the layer.
    """

    def __init__(
        self,
        layer: nn.Module,
        width: int | None,
        activation: nn.Module | None = None,
        gate: str = "hard_sigmoid",
        sigma: float = 1.0,
        norm: nn.Module | None = None,
    ):
        super().__init__()
        if not isinstance(layer, LAYERS) or (isinstance(layer, nn.Conv2d) and layer.groups != 1):
            raise ValueError(f"layer must be an nn.Linear or an nn.Conv2d with groups=1, got {layer!r}")
        if norm is not None and not _norm_of(layer, norm):
            raise ValueError(
                f"norm must be an nn.{NORMS[type(layer)].__name__} over the layer's {_channels(layer)} "
                f"channels with running statistics, got {norm!r}"
            )
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
            raise ValueError(f"sigma must be a positive number, got {sigma!r}")
        channels = _channels(layer)
        if width is not None and (isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= channels):
            raise ValueError(f"width must be an int in [1, {channels}] (the layer's channels), got {width!r}")
        self.layer, self.norm = layer, norm
        self.slots: tuple[str, ...] = ()  # keys of the Sequential slots `insert` emptied (norm, activation)
        self.activation = activation if activation is not None else nn.Identity()
        self.gate, self.sigma = gate, float(sigma)
        kw = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        if width is None:
            self.encoder = self.decoder = None
        else:
            if width == channels:
                q = torch.eye(channels, **kw)
            else:
                q = torch.linalg.qr(torch.randn(channels, width, dtype=torch.float64)).Q.to(**kw)
            self.encoder = _projection(layer, q.T)
            self.decoder = _projection(layer, q)
        start = self.sigma / 2 if gate == "hard_sigmoid" else 2 * self.sigma
        self.m = nn.Parameter(torch.full((width or channels,), start, **kw))

    def gates(self) -> Tensor:
        """h_σ(m), one gate per compressed channel (per channel of the layer in the baseline)."""
        return gate_value(self.m, self.gate, self.sigma)

    def forward(self, x: Tensor) -> Tensor:
        z = self.layer(x)
        if self.norm is not None:
            z = self.norm(z)
        if self.encoder is not None:
            z = self.encoder(z)
        g = self.gates()
        z = self.activation(z * (g.view(-1, 1, 1) if isinstance(self.layer, nn.Conv2d) else g))
        return self.decoder(z) if self.decoder is not None else z


def _norm_of(layer: nn.Module, module: nn.Module) -> bool:
    """Whether `module` is a BatchNorm of `layer`'s kind over its channels, with running statistics."""
    return type(module) is NORMS[type(layer)] and module.num_features == _channels(layer) and module.track_running_stats


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, key = name.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), key


def _next_key(parent: nn.Module, key: str) -> str | None:
    keys = [k for k, _ in parent.named_children()]
    i = keys.index(key)
    return keys[i + 1] if i + 1 < len(keys) else None


def blocks(model: nn.Module) -> dict[str, PruningBlock]:
    """{name: PruningBlock} of every block in `model`, in module order.

    Args:
        model: a model with blocks inserted.

    Returns:
        {name: PruningBlock}.
    """
    return {n: m for n, m in model.named_modules() if isinstance(m, PruningBlock)}


class Inserted:
    """What `insert` did: `.blocks` ({layer name: PruningBlock}); `.remove()` (or leaving a `with`
    block) puts the original layers, BatchNorms and activations back, with their trained weights, and
    drops E, D and the gates."""

    def __init__(self, model: nn.Module, blocks: dict[str, PruningBlock]):
        self.model, self.blocks, self.removed = model, blocks, False

    def remove(self) -> None:
        if self.removed:
            raise RuntimeError("these Pruning Blocks were already removed")
        for name, block in self.blocks.items():
            parent, key = _parent(self.model, name)
            if getattr(parent, key) is not block:
                raise RuntimeError(f"the module at {name!r} is no longer the Pruning Block inserted there")
            setattr(parent, key, block.layer)
            for slot, module in zip(block.slots, _taken(block)):
                setattr(parent, slot, module)
        self.removed = True

    def __enter__(self) -> Inserted:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def insert(
    model: nn.Module,
    layers: str | Iterable[str],
    *,
    width: int | None = None,
    ratio: float | None = None,
    encoder: bool = True,
    gate: str = "hard_sigmoid",
    sigma: float = 1.0,
) -> Inserted:
    """Puts a PruningBlock after each named Conv2d/Linear of `model`, in place (the block holds the
    layer and takes its place). Compressed width C' = `width`, or round(`ratio` × C), or C when neither
    is given. `encoder=False`: the continuous-gate baseline (gates on the layer's own C channels; no
    width or ratio then). Returns a handle whose `.remove()` undoes it; usable as a context manager.

    Args:
        model: the model, changed in place.
        layers: the Conv2d/Linear names (or one name).
        width: C' of every block.
        ratio: C' = round(ratio × C) of each block.
        encoder: False: the continuous-gate baseline.
        gate, sigma: as gate_value's.

    Returns:
        The Inserted handle.
    """
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"layers must be a module name or a non-empty list of them, got {layers!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"layers names a module twice: {names}")
    if width is not None and ratio is not None:
        raise ValueError(f"give width or ratio, not both (width={width!r}, ratio={ratio!r})")
    if not encoder and (width is not None or ratio is not None):
        raise ValueError("width and ratio size the encoder; the baseline (encoder=False) takes neither")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1):
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    modules = dict(model.named_modules())
    inside = [n for n, m in modules.items() if isinstance(m, PruningBlock)]
    for name in names:
        if name not in modules:
            raise ValueError(f"layers names a module the model does not have: {name!r}")
        if any(name == b or name.startswith(b + ".") for b in inside):
            raise ValueError(f"{name!r} already has a Pruning Block")
        if not isinstance(modules[name], LAYERS):
            raise ValueError(f"{name!r} is a {type(modules[name]).__name__}; blocks go after Conv2d/Linear layers")
    made = {}
    for name in names:  # every block built (and its arguments checked) before the model is touched
        layer = modules[name]
        channels = _channels(layer)
        c = width if width is not None else (max(1, round(ratio * channels)) if ratio is not None else channels)
        parent, key = _parent(model, name)
        slots, norm, act = [], None, None
        after = _next_key(parent, key) if isinstance(parent, nn.Sequential) else None
        if after is not None and _norm_of(layer, getattr(parent, after)):
            norm = getattr(parent, after)
            slots.append(after)
            after = _next_key(parent, after)
        if after is not None and isinstance(getattr(parent, after), ACTIVATIONS):
            act = getattr(parent, after)
            slots.append(after)
        made[name] = PruningBlock(layer, c if encoder else None, act, gate, sigma, norm)
        made[name].slots = tuple(slots)
    for name, block in made.items():
        parent, key = _parent(model, name)
        setattr(parent, key, block)
        for slot in block.slots:
            setattr(parent, slot, nn.Identity())
    return Inserted(model, made)


def _taken(block: PruningBlock) -> list[nn.Module]:
    """The modules `insert` took out of the slots `block.slots`, in order: the norm, the activation."""
    return [m for m in (block.norm, block.activation) if m is not None and not isinstance(m, nn.Identity)]


def _blocks_or_raise(model: nn.Module) -> dict[str, PruningBlock]:
    found = blocks(model)
    if not found:
        raise ValueError("model has no Pruning Block; call pruning_block.insert(model, layers) first")
    return found


def regularizer(model: nn.Module) -> Tensor:
    """R(M) = Σ_l Σ_c h_σ(m_c^l) / C^l over the blocks of `model` (C^l: the gates of block l).

    Args:
        model: a model with blocks inserted.

    Returns:
        R(M), a 0-d tensor that gradients flow through.
    """
    return sum(b.gates().sum() / b.m.numel() for b in _blocks_or_raise(model).values())


def masks(model: nn.Module, threshold: float = 0.5) -> dict[str, Tensor]:
    """{layer name: (C',) bool}: True where h_σ(m_c) ≥ threshold (the channel stays).

    Args:
        model: a model with blocks inserted.
        threshold: the gate value from which a channel stays.

    Returns:
        {layer name: (C',) bool keep-mask}.
    """
    _check_threshold(threshold)
    return {n: (b.gates() >= threshold).detach() for n, b in _blocks_or_raise(model).items()}


def _check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")


def _split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    gates = [b.m for b in _blocks_or_raise(model).values()]
    ids = {id(p) for p in gates}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in ids], gates


def _check_optimizer(opt: torch.optim.Optimizer, allowed: list[nn.Parameter], name: str, what: str) -> None:
    ids = {id(p) for p in allowed}
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"{name} must be a torch.optim.Optimizer, got {type(opt).__name__}")
    if any(id(p) not in ids for group in opt.param_groups for p in group["params"]):
        raise ValueError(f"{name} must hold only {what}")


def train(
    model: nn.Module,
    loss: Callable[..., Tensor],
    data: Iterable | None = None,
    *,
    steps: int,
    lam: float,
    weight_optimizer: torch.optim.Optimizer | None = None,
    gate_optimizer: torch.optim.Optimizer | None = None,
    threshold: float = 0.5,
) -> dict[str, list[float]]:
    """Alternate updates for `steps` steps: each step draws one batch (`data` is cycled; `loss(model,
    batch)`, or `loss(model)` when data is None), takes a step of `weight_optimizer` on ∇_W L, then a
    step of `gate_optimizer` on ∇_M (L + lam·R(M)). Defaults: Adam(lr=1e-3) over the weights (every
    parameter with requires_grad that is not a gate), Adam(lr=1e-2) over the auxiliary variables.
    Returns per step "loss", "regularizer" (both from the gate step) and "on" (gates ≥ threshold).

    Args:
        model: a model with blocks inserted, trained in place.
        loss: `loss(model, batch)`, or `loss(model)` without data.
        data: the batches, cycled.
        steps: alternate steps.
        lam: λ, the weight of the regularizer.
        weight_optimizer, gate_optimizer: the two optimizers (defaults above).
        threshold: the gate value counted as on.

    Returns:
        {"loss": [...], "regularizer": [...], "on": [...]}, one value a step.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
        raise ValueError(f"lam must be a number >= 0, got {lam!r}")
    _check_threshold(threshold)
    weights, gates = _split(model)
    opt_w = weight_optimizer if weight_optimizer is not None else torch.optim.Adam(weights, lr=1e-3)
    opt_m = gate_optimizer if gate_optimizer is not None else torch.optim.Adam(gates, lr=1e-2)
    _check_optimizer(opt_w, weights, "weight_optimizer", "network weights (no gate variable m)")
    _check_optimizer(opt_m, gates, "gate_optimizer", "the blocks' auxiliary variables m")
    batches = _cycle(data)
    history = {"loss": [], "regularizer": [], "on": []}

    def objective(batch) -> Tensor:
        return loss(model) if data is None else loss(model, batch)

    for _ in range(steps):
        batch = next(batches)
        opt_w.zero_grad(set_to_none=True)
        opt_m.zero_grad(set_to_none=True)
        objective(batch).backward()
        opt_w.step()
        opt_w.zero_grad(set_to_none=True)
        opt_m.zero_grad(set_to_none=True)
        value, reg = objective(batch), regularizer(model)
        (value + lam * reg).backward()
        opt_m.step()
        with torch.no_grad():
            history["loss"].append(float(value))
            history["regularizer"].append(float(reg))
            history["on"].append(sum(int((b.gates() >= threshold).sum()) for b in blocks(model).values()))
    opt_w.zero_grad(set_to_none=True)
    opt_m.zero_grad(set_to_none=True)
    return history


def _cycle(data: Iterable | None):
    if data is None:
        while True:
            yield None
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ValueError("data yielded no batch (a generator is used up after one pass: pass a list)")


def _resized(layer: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    """A new module of `layer`'s kind and hyper-parameters holding `weight` and `bias` (new channel counts)."""
    kw = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    if isinstance(layer, nn.Linear):
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, **kw)
    else:
        new = nn.Conv2d(
            weight.shape[1],
            weight.shape[0],
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            bias=bias is not None,
            padding_mode=layer.padding_mode,
            **kw,
        )
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def _matrix(proj: nn.Module) -> Tensor:
    return proj.weight.detach().double().flatten(1)


def _next_layer(parent: nn.Module, key: str, layer: nn.Module, channels: int) -> str | None:
    """The key of the Conv2d/Linear (or block around one) that directly follows `key` in a Sequential,
    past nn.Identity modules only, when it is of `layer`'s kind and takes `channels` inputs."""
    if not isinstance(parent, nn.Sequential):
        return None
    after = _next_key(parent, key)
    while after is not None and isinstance(getattr(parent, after), nn.Identity):
        after = _next_key(parent, after)
    if after is None:
        return None
    nxt = getattr(parent, after)
    inner = nxt.layer if isinstance(nxt, PruningBlock) else nxt
    same = type(inner) is type(layer) and getattr(inner, "groups", 1) == 1
    width = inner.in_channels if isinstance(inner, nn.Conv2d) else getattr(inner, "in_features", None)
    return after if same and width == channels else None


@torch.no_grad()
def fold(model: nn.Module, threshold: float = 0.5) -> tuple[nn.Module, dict[str, dict]]:
    """A copy of `model` with every Pruning Block folded away (see the module docstring); `model` is
    left as it is. Returns (plain model, report): report[layer name] = {"kept": (C',) bool mask,
    "channels": k, "next": name of the layer that took the decoder / the pruned inputs, or None}.

    Args:
        model: a model with blocks inserted (left unchanged).
        threshold: the gate value from which a channel stays.

    Returns:
        (the folded model, the report per layer).
    """
    _check_threshold(threshold)
    plain = copy.deepcopy(model)
    found = _blocks_or_raise(plain)
    report = {}
    for name, block in found.items():
        parent, key = _parent(plain, name)
        layer, g = block.layer, block.gates().double()
        kept = g >= threshold
        k = int(kept.sum())
        if k == 0:
            raise ValueError(f"every gate of {name!r} is below threshold={threshold}: the layer would vanish")
        channels, dtype = _channels(layer), layer.weight.dtype
        w = layer.weight.detach().double()
        b = layer.bias.detach().double() if layer.bias is not None else None
        if block.norm is not None:
            w, b = _with_norm(w, b, block.norm)
        eye = torch.eye(channels, dtype=torch.float64, device=w.device)
        rows = g[kept, None] * (_matrix(block.encoder)[kept] if block.encoder is not None else eye[kept])
        first_w = (rows @ w.flatten(1)).reshape(k, *w.shape[1:])
        first_b = rows @ b if b is not None else None
        nxt_key = _next_layer(parent, key, layer, channels)
        if block.decoder is not None:
            tail = _matrix(block.decoder)[:, kept]  # (C, k): what follows the activation
        else:
            tail = eye[:, kept]
        if nxt_key is not None:
            holder = getattr(parent, nxt_key)
            target = holder.layer if isinstance(holder, PruningBlock) else holder
            wn = target.weight.detach().double()
            new_wn = torch.einsum("oc...,cp->op...", wn, tail)
            new_next = _resized(target, new_wn.to(target.weight.dtype), target.bias)
            if isinstance(holder, PruningBlock):
                holder.layer = new_next
            else:
                setattr(parent, nxt_key, new_next)
            first = _resized(layer, first_w.to(dtype), None if first_b is None else first_b.to(dtype))
            after = block.activation
        elif block.decoder is not None:
            first = _resized(layer, first_w.to(dtype), None if first_b is None else first_b.to(dtype))
            after = nn.Sequential(block.activation, _projection(layer, tail.to(dtype)))
        else:
            full_w = torch.zeros_like(w)
            full_w[kept] = first_w
            full_b = None
            if b is not None:
                full_b = torch.zeros_like(b)
                full_b[kept] = first_b
            first = _resized(layer, full_w.to(dtype), None if full_b is None else full_b.to(dtype))
            after = block.activation
        if block.slots:
            setattr(parent, key, first)
            setattr(parent, block.slots[-1], after)
        elif isinstance(after, nn.Identity):
            setattr(parent, key, first)
        else:
            setattr(parent, key, nn.Sequential(first, after))
        report[name] = {"kept": kept.cpu(), "channels": k, "next": _join(name, nxt_key)}
    return plain, report


def _with_norm(w: Tensor, b: Tensor | None, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """(weight, bias) of the layer followed by `norm` in eval mode: the running statistics and the affine
    map multiplied into the rows, BN(z) = (z − μ)·γ/√(σ² + ε) + β."""
    scale = 1 / torch.sqrt(norm.running_var.double() + norm.eps)
    shift = -norm.running_mean.double() * scale
    if norm.affine:
        scale, shift = scale * norm.weight.double(), shift * norm.weight.double() + norm.bias.double()
    w = w * scale.view(-1, *([1] * (w.dim() - 1)))
    return w, (shift if b is None else b * scale + shift)


def _join(name: str, key: str | None) -> str | None:
    if key is None:
        return None
    prefix = name.rpartition(".")[0]
    return f"{prefix}.{key}" if prefix else key
