"""The cost of keeping masks while training (masks.keep): one AdamW step of the default model
(all-MiniLM-L6-v2, InfoNCE on one fine-tuning batch of 8 passages × 64 tokens) with the masks of 90 %
global magnitude pruning kept, against the same step without them, and the keep hooks alone (the
masked fill of the gradients before the step and of the weights after it)."""

from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .. import masks
from ..modeling import default_param_names
from .harness import Case


def keep_step_case(device: str = "cpu", scale: float = 1.0) -> Case:
    """`ours`: a training step with the masks kept; baselines: the plain step, and the two hooks alone
    (so that their share of a step can be read without the step's noise). `scale` is unused: the
    workload is the default model as it is."""
    from ..app import zoo

    bundle = zoo.minilm(device)
    model = bundle.model.train()
    named = dict(model.named_parameters())
    scores = {n: named[n].detach().abs() for n in default_param_names(model)}
    keep = masks.global_unstructured(scores, 0.9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    inputs, _ = bundle.training[0]

    def step():
        loss = zoo.info_nce(model(inputs))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # the gradients stay allocated: the hooks see them every call

    step()  # the optimizer's state exists before any timing
    handle = masks.keep(model, keep)  # built once, as in training; its hooks are on only during `kept`
    handle.remove()

    def kept():
        hooks = [
            register_optimizer_step_pre_hook(handle.mask_gradients),
            register_optimizer_step_post_hook(handle.zero_weights),
        ]
        try:
            step()
        finally:
            for hook in hooks:
                hook.remove()

    def hooks():
        handle.mask_gradients(optimizer)
        handle.zero_weights(optimizer)

    pruned = sum(int((~m).sum()) for m in keep.values())
    return Case(
        group=f"masks.keep: one AdamW step of all-MiniLM-L6-v2 ({tuple(inputs['input_ids'].shape)} tokens) {device}",
        ours=kept,
        baselines={"plain step (no masks kept)": step, "the keep hooks alone": hooks},
        elements=sum(m.numel() for m in keep.values()),
        extra={"pruned": pruned},
    )
