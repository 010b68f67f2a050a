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

from ..criteria.channel import CHANNEL_CRITERIA, out_channels

_OUT_CHANNELS = (tp_function.prune_conv_out_channels, tp_function.prune_linear_out_channels)


class Importance(tp.importance.GroupMagnitudeImportance):
    """A Torch-Pruning importance from a pyprune_fast channel criterion (a name of
    `criteria.channel.CHANNEL_CRITERIA` or a function with the same signature), run once with
    `data`, `loss_fn`, `layers`, `normalize` and `p`, then looked up per group."""

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
            if criterion not in CHANNEL_CRITERIA:
                valid = ", ".join(sorted(CHANNEL_CRITERIA))
                raise ValueError(f"unknown channel criterion {criterion!r}; valid: {valid}")
            criterion = CHANNEL_CRITERIA[criterion]
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
