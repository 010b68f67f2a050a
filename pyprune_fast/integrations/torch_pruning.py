"""pyprune_fast's channel criteria as a Torch-Pruning importance (torch-pruning from PyPI, optional).

    import torch_pruning as tp
    from pyprune_fast.integrations.torch_pruning import Importance

    imp = Importance("taylor", batches, loss_fn=loss)
    pruner = tp.pruner.MetaPruner(model, example_inputs, importance=imp, pruning_ratio=0.5,
                                  ignored_layers=[model.fc])
    pruner.step()  # Torch-Pruning removes the channels, across dependent layers

Torch-Pruning asks for the importance of one dependency group at a time: the layers whose channels
must be removed together (a conv, its BatchNorm, the next conv's inputs; the convs tied by a residual
sum). Our criterion scores every Conv/Linear output channel of the model once (on the model the
dependency graph was built on), the scores are cached, and each group's importance is the scores of
its Conv/Linear out-channel members, mapped onto the root's channel indices and reduced the way
Torch-Pruning's own importances reduce a group (`group_reduction`, default the mean over those
members, then `normalizer`, default division by the mean; both are Torch-Pruning's). Members whose
layer has no score (BatchNorms, input-channel pruning, layers the criterion skipped) do not count; a
group with no scored member returns None, which Torch-Pruning skips. The cache is rebuilt when a
scored layer's channel count no longer matches (after a pruning step, for iterative pruning)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

try:
    import torch_pruning as tp
    from torch_pruning.pruner import function as tp_function
except ImportError as error:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError(
        "pyprune_fast.integrations.torch_pruning needs Torch-Pruning: pip install torch-pruning"
    ) from error

from ..criteria import of_kind
from ..modeling import out_channels

_OUT_CHANNELS = (tp_function.prune_conv_out_channels, tp_function.prune_linear_out_channels)


class Importance(tp.importance.GroupMagnitudeImportance):
    """A Torch-Pruning importance from a pyprune_fast channel criterion (a name of
    `criteria.of_kind("channel")`, e.g. "taylor", or a function with the same signature), run once with
    `data`, `loss_fn`, `layers`, `normalize` and `p`, then looked up per group.

    Args:
        criterion: a channel criterion's name or function.
        data: its calibration batches.
        loss_fn: its loss.
        layers: the layers it scores (default: every Conv/Linear).
        normalize, p: as the channel criteria take them.
        group_reduction, normalizer: Torch-Pruning's, for its groups.
    """

    def __init__(
        self,
        criterion: str | Callable[..., dict[str, Tensor]],
        data: Iterable | None = None,
        loss_fn: Callable | None = None,
        *,
        layers=None,
        normalize: str | None = None,
        p: float = 1.0,
        group_reduction: str = "mean",
        normalizer: str | None = "mean",
    ) -> None:
        if isinstance(criterion, str):
            channel = of_kind("channel")
            if criterion not in channel:
                raise ValueError(f"unknown channel criterion {criterion!r}; valid: {', '.join(sorted(channel))}")
            criterion = channel[criterion]
        elif not callable(criterion):
            raise TypeError(f"criterion must be a channel criterion name or callable, got {type(criterion).__name__}")
        if group_reduction not in ("mean", "sum", "max", "prod", "first"):
            raise ValueError(f"group_reduction must be mean, sum, max, prod or first, got {group_reduction!r}")
        super().__init__(group_reduction=group_reduction, normalizer=normalizer)
        self.criterion = criterion
        self.options = {"loss_fn": loss_fn, "layers": layers, "normalize": normalize, "p": p}
        self.data = data
        self._scores: dict[int, Tensor] | None = None
        self._modules: dict[int, nn.Module] = {}

    def _stale(self) -> bool:
        return self._scores is None or any(
            out_channels(self._modules[key]) != s.numel() for key, s in self._scores.items()
        )

    def scores(self, model: nn.Module) -> dict[int, Tensor]:
        """The criterion's scores keyed by id(module), computed on first use and when stale."""
        if self._stale():
            named = self.criterion(model, self.data, **self.options)
            modules = dict(model.named_modules())
            self._modules = {id(modules[n]): modules[n] for n in named}
            self._scores = {id(modules[n]): s.detach() for n, s in named.items()}
        return self._scores

    @torch.no_grad()
    def __call__(self, group) -> Tensor | None:
        scores = self.scores(group._DG.model)
        imps, root_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            if dep.pruning_fn in _OUT_CHANNELS and id(dep.layer) in scores:
                imps.append(scores[id(dep.layer)][torch.as_tensor(idxs, dtype=torch.long)].float())
                root_idxs.append(group[i].root_idxs)
        if not imps:
            return None
        return self._normalize(self._reduce(imps, root_idxs), self.normalizer)


def remove_channels(
    model: nn.Module,
    keep: dict[str, Tensor],
    example_inputs,
    forward_fn: Callable | None = None,
) -> dict[str, Tensor]:
    """Removes, physically and in place, the output channels that the channel masks `keep` ({layer
    name: (C,) bool, True = kept}, e.g. `masks.channels(...)`) prune, with Torch-Pruning's dependency
    graph: each layer's pruned rows go together with what depends on them (the next layers' input
    channels, BatchNorms). Layers tied by a residual sum form one group and lose the union of their
    pruned channels. Returns the channels removed, {layer: original indices (int64)}.
    `example_inputs` / `forward_fn(model, inputs)`: one forward to trace the model, as Torch-Pruning
    takes them.

    Args:
        model: the model, changed in place.
        keep: {layer name: (C,) bool keep-mask}.
        example_inputs: inputs for one forward.
        forward_fn: `forward_fn(model, inputs)`, if the model is not called as `model(inputs)`.

    Returns:
        {layer name: the removed channels' original indices (int64)}.
    """
    modules = dict(model.named_modules())
    unknown = [n for n in keep if n not in modules or not isinstance(modules[n], (nn.Linear, nn.Conv1d, nn.Conv2d))]
    if unknown:
        raise ValueError(f"keep names layers that are not Linear/Conv1d/Conv2d modules of the model: {unknown}")
    for name, mask in keep.items():
        if mask.dtype != torch.bool or mask.shape != (out_channels(modules[name]),):
            raise ValueError(
                f"keep[{name!r}] must be a bool ({out_channels(modules[name])},) mask, got {mask.dtype} "
                f"{tuple(mask.shape)}"
            )
        if not bool(mask.any()):
            raise ValueError(f"keep[{name!r}] prunes every channel of the layer; a removed layer cannot be rebuilt")
    with torch.enable_grad():  # Torch-Pruning traces the graph through autograd
        graph = tp.DependencyGraph().build_dependency(model, example_inputs, forward_fn=forward_fn, verbose=False)
    by_module = {id(modules[n]): n for n in keep}
    present = {n: list(range(out_channels(modules[n]))) for n in keep}  # original ids still in each layer
    removed: dict[str, list[int]] = {n: [] for n in keep}
    for name, mask in keep.items():
        module = modules[name]
        doomed = {i for i in (~mask.cpu()).nonzero().flatten().tolist()}
        idxs = [pos for pos, original in enumerate(present[name]) if original in doomed]
        if not idxs:
            continue
        fn = (
            tp_function.prune_linear_out_channels
            if isinstance(module, nn.Linear)
            else tp_function.prune_conv_out_channels
        )
        group = graph.get_pruning_group(module, fn, idxs)
        members = [
            (by_module[id(dep.layer)], dep_idxs)
            for dep, dep_idxs in group
            if dep.pruning_fn in _OUT_CHANNELS and id(dep.layer) in by_module
        ]
        group.prune()
        for member, member_idxs in members:
            gone = set(int(i) for i in member_idxs)
            removed[member] += [present[member][i] for i in sorted(gone)]
            present[member] = [o for i, o in enumerate(present[member]) if i not in gone]
    return {n: torch.tensor(sorted(set(v)), dtype=torch.int64) for n, v in removed.items()}
