"""SparseLinear (a Linear layer with a compressed 2:4 weight) and sparsify (put them into a model)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from .. import masks, ops
from ..ops.checks import check_compressed, check_features_24
from ..ops.sparse24 import launch_24

# Metadata of chunks that keep positions 0 and 1 (nibble 0b0100), the placeholder of a new layer.
_PLACEHOLDER_WORD = 0x44444444


class SparseLinear(nn.Module):
    """y = act(x Wᵀ + b) with W [out, in] 2:4-sparse, kept compressed (`values` [out, in/2] and the
    `meta` buffer, see ops.compress_24) and multiplied by ops.sparse24_linear: the sparse tensor cores
    on CUDA (float16/bfloat16), decompress + matmul on CPU. act: None, 'relu' or 'gelu' (exact erf).

    `values` and `bias` are parameters with requires_grad=False (the layer is differentiable in its
    input, not in its weight). state_dict holds values, meta and bias; `.to()`, `.half()` and
    `.bfloat16()` convert values and bias and leave meta (int32) as it is.

    Args:
        in_features, out_features: the layer's sizes, multiples of 64.
        bias: whether the layer has a bias.
        activation: None, "relu" or "gelu".
        device, dtype: as nn.Linear's.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 64:
                raise ValueError(f"{name} must be a positive multiple of 64, got {value!r}")
        factory = {"device": device, "dtype": dtype}
        values = torch.zeros(out_features, in_features // 2, **factory)
        meta = torch.full(
            (out_features // 16, in_features // 32, 16), _PLACEHOLDER_WORD, dtype=torch.int32, device=device
        )
        self._set(values, meta, torch.zeros(out_features, **factory) if bias else None, activation)

    def _set(self, values: Tensor, meta: Tensor, bias: Tensor | None, activation: str | None) -> None:
        if activation not in ops.ACTIVATIONS:
            raise ValueError(f"activation must be None, 'relu' or 'gelu', got {activation!r}")
        self.out_features, self.in_features = values.shape[0], 2 * values.shape[1]
        self.activation = activation
        self.values = nn.Parameter(values, requires_grad=False)
        self.register_buffer("meta", meta)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_compressed(
        cls, values: Tensor, meta: Tensor, bias: Tensor | None = None, activation: str | None = None
    ) -> SparseLinear:
        """A layer holding (values, meta) from ops.compress_24 (validated) and an optional bias [out]."""
        out, cols = check_compressed(values, meta)
        check_features_24(cols, out, "SparseLinear")
        ops.decompress_24(values, meta)  # refuses metadata that is not ordered 2:4 pairs
        if bias is not None and (bias.shape != (out,) or bias.dtype != values.dtype or bias.device != values.device):
            raise ValueError(
                f"bias must be a [{out}] {values.dtype} tensor on {values.device}, got {tuple(bias.shape)} "
                f"{bias.dtype} on {bias.device}"
            )
        return cls._wrap(values.detach(), meta.detach(), None if bias is None else bias.detach(), activation)

    @classmethod
    def _wrap(cls, values: Tensor, meta: Tensor, bias: Tensor | None, activation: str | None) -> SparseLinear:
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._set(values, meta, bias, activation)
        return module

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Tensor | None = None, activation: str | None = None) -> SparseLinear:
        """The 2:4 version of `linear`: its weight times `mask` (bool, True = keep, exactly 2 of every 4
        consecutive entries of a row; default masks.n_m of |W|, or pass masks.n_m(scores)[name] for any
        criterion's scores), compressed."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        check_features_24(linear.in_features, linear.out_features, "SparseLinear")
        weight = linear.weight.detach()
        if mask is None:
            mask = masks.n_m({"weight": weight.abs()}, 2, 4)["weight"]
        values, meta = ops.compress_24(weight, mask)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls._wrap(values, meta, bias, activation)

    def forward(self, x: Tensor) -> Tensor:
        values, bias = self.values, self.bias
        if (  # the weights were validated when set or loaded: only x's agreement is checked per call
            x.dtype == values.dtype
            and x.device == values.device
            and x.dim() >= 1
            and x.shape[-1] == self.in_features
            and not (x.is_cuda and x.dtype == torch.float32)
            and not values.requires_grad
            and (bias is None or (bias.dtype == values.dtype and bias.device == values.device))
        ):
            return launch_24(x, values, self.meta, bias, self.activation)
        return ops.sparse24_linear(x, values, self.meta, bias, self.activation)  # its checks name what is wrong

    def dense_weight(self) -> Tensor:
        """The weight [out, in] with zeros at the pruned positions."""
        return ops.decompress_24(self.values, self.meta)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        values, meta = state_dict.get(prefix + "values"), state_dict.get(prefix + "meta")
        if (
            isinstance(values, Tensor)
            and isinstance(meta, Tensor)
            and values.shape == self.values.shape
            and meta.shape == self.meta.shape
        ):
            ops.decompress_24(values.to(self.values.dtype), meta)  # refuses corrupt metadata before loading it
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"activation={self.activation}"
        )


def _eligible(model: nn.Module) -> dict[str, nn.Linear]:
    """Linear layers sparse24_linear can run: exactly nn.Linear (subclasses such as
    MultiheadAttention's out_proj are read through .weight by their owner), in and out multiples of 64,
    a weight no other module shares."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {
        name: m
        for name, m in model.named_modules()
        if type(m) is nn.Linear and m.in_features % 64 == 0 and m.out_features % 64 == 0 and uses[id(m.weight)] == 1
    }


@torch.no_grad()
def sparsify(
    model: nn.Module,
    scores: Mapping[str, Tensor] | None = None,
    filter: Callable[[str, nn.Linear], bool] | None = None,
) -> list[str]:
    """Replaces, in place, eligible nn.Linear layers of `model` by SparseLinear and returns their names.

    Eligible: exactly nn.Linear, in and out features multiples of 64, a weight not shared (tied) with
    another module, and `filter(name, linear)` true when given. Masks: masks.n_m(…, 2, 4) of
    `scores['<name>.weight']` when `scores` is given (any criterion's output; layers without a score
    stay dense), else of |W|. Every layer is compressed before any is replaced, so an error leaves the
    model as it was.

    Args:
        model: the model, changed in place.
        scores: {"<layer>.weight": scores} choosing each layer's 2:4 masks; None: |W|.
        filter: `filter(name, linear)`, whether a layer is replaced.

    Returns:
        The names of the replaced layers.
    """
    if scores is not None and not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a dict of parameter name -> Tensor, got {type(scores).__name__}")
    chosen = {name: m for name, m in _eligible(model).items() if filter is None or filter(name, m)}
    if scores is not None:
        chosen = {name: m for name, m in chosen.items() if f"{name}.weight" in scores}
    for name, m in chosen.items():
        score = scores[f"{name}.weight"] if scores is not None else None
        if score is not None and (not isinstance(score, Tensor) or score.shape != m.weight.shape):
            got = tuple(score.shape) if isinstance(score, Tensor) else type(score).__name__
            raise ValueError(f"scores[{name + '.weight'!r}] is {got} but the weight has shape {tuple(m.weight.shape)}")
    replacements = {}
    for name, m in chosen.items():  # layer by layer: one layer's scores and mask in memory at a time
        key = f"{name}.weight"
        score = scores[key].to(m.weight.device) if scores is not None else m.weight.abs()
        replacements[name] = SparseLinear.from_dense(m, masks.n_m({key: score}, 2, 4)[key])
    for name, new in replacements.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return list(replacements)
