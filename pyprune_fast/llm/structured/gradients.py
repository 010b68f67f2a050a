"""Block-local gradients of MLP channels and attention heads, for the gradient scores (scores.py: taylor,
fisher, ide): no gradient through the whole model, the objective of llm.local's snip on one block.

    L = Σ_b ‖f(X_b; M) − Y_b‖²    f: the block with a mask m_u on the consumer input of each unit u
                                  (the input columns of down_proj / o_proj: a channel, or a head's
                                  head_dim columns), X_b its calibration inputs, Y_b its dense outputs

At M = 1 the block reproduces Y_b and L and its gradient vanish, so, as snip does, the gradients are
taken at the candidate M_c: the units the magnitude score would drop (as many as the block loses)
masked. x_n is the consumer input of the unit on calibration sequence n, unmasked ([tokens] for a
channel, [tokens × head_dim] for a head), ∇_n = ∂L/∂(x_n ⊙ m) at M_c, so that x_nᵀ∇_n = ∂L_n/∂m_u: the
first-order change of the block's reconstruction error when unit u is flipped (kept ↔ dropped). A head's
x_nᵀ∇_n sums over all its columns before any square: the group form of Molchanov et al. (2019) and of
Liu et al. (2021). The sums (Σ x_nᵀ∇_n, Σ (x_nᵀ∇_n)², Σ x_n, Σ ∇_n) are the registry's ChannelStats,
with the units as channels and the tokens (× head_dim) as positions."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from ...criteria.channel_stats import ChannelStats
from ...modeling import preserved
from ..blocks import BlockInputs
from ..local import reconstruction_error


def unit_view(x: Tensor, batch: int, head_dim: int | None) -> Tensor:
    """A consumer input of `batch` sequences ([b, T, C], or [b·T, C] as OPT flattens its MLP's) as
    [b, positions, units]: [b, T, C] for MLP channels; for heads [b, T·head_dim, heads] (each head's
    head_dim columns become positions)."""
    x = x.reshape(batch, -1, x.shape[-1])
    if head_dim is None:
        return x
    return x.reshape(batch, x.shape[1], -1, head_dim).transpose(-1, -2).reshape(batch, -1, x.shape[-1] // head_dim)


@contextlib.contextmanager
def _masked_inputs(consumers: dict[str, nn.Linear], masks: dict[str, Tensor]) -> Iterator[dict]:
    """Each consumer's input x replaced by x ⊙ m, which requires a gradient (a leaf when nothing before
    it does: the attention's; the MLP's then follows from it, so that the attention's gradient flows
    through the MLP too); yields {part: (x, x ⊙ m)} of the last call."""
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    handles = []
    for part, linear in consumers.items():

        def hook(_module, args, kwargs, part=part):
            x = args[0] if args else kwargs["input"]
            masked = x * masks[part].to(x.device, x.dtype)
            if not masked.requires_grad:
                masked.requires_grad_(True)
            seen[part] = (x.detach(), masked)
            return ((masked, *args[1:]), kwargs) if args else (args, {**kwargs, "input": masked})

        handles.append(linear.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def unit_gradients(
    block: nn.Module,
    inputs: BlockInputs,
    consumers: dict[str, nn.Linear],
    dropped: dict[str, Tensor],
    needs: Iterable[str],
    head_dim: int,
) -> dict[str, ChannelStats]:
    """{part: ChannelStats of its units} over every calibration batch (module docstring). `consumers`:
    {"mlp": down_proj, "attention": o_proj}; `dropped[part]`: the candidate's dropped input columns."""
    masks = {}
    for part, linear in consumers.items():
        masks[part] = torch.ones(linear.in_features)
        masks[part][dropped[part]] = 0.0
    stats = {part: ChannelStats(linear, set(needs)) for part, linear in consumers.items()}
    with torch.no_grad():
        targets = [inputs.run(block, j) for j in range(len(inputs))]
    with preserved(block, []), _masked_inputs(consumers, masks) as seen:
        for p in block.parameters():  # gradients of the consumer inputs only
            p.requires_grad_(False)
        for j in range(len(inputs)):
            seen.clear()
            loss = reconstruction_error(inputs.run(block, j), targets[j])
            parts = [part for part in consumers if part in seen]
            grads = torch.autograd.grad(loss, [seen[part][1] for part in parts], allow_unused=True)
            for part, g in zip(parts, grads):
                x, b = seen[part][0], inputs.hidden[j].shape[0]
                g = torch.zeros_like(x) if g is None else g
                d = head_dim if part == "attention" else None
                stats[part].add_output(unit_view(x, b, d))
                stats[part].add_gradient(unit_view(x, b, d), unit_view(g, b, d))
            del loss, grads
    missing = [part for part, s in stats.items() if not s.samples]
    if missing:
        raise ValueError(f"the block's {missing} consumer Linear was not called in its forward")
    return stats
