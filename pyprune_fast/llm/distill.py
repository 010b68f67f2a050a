"""Recovery after structured pruning: the pruned model (student) fine-tuned to reproduce the dense
model's (teacher's) next-token distributions, the way width- and depth-pruned LLMs are finished
(Minitron: Muralidharan et al., 2024; Sreenivas et al., 2024).

    loss = τ² · mean over tokens of KL(softmax(z_teacher / τ) ‖ softmax(z_student / τ))

(logit distillation, Hinton, Vinyals and Dean, 2015), AdamW on every trainable parameter of the
student, one batch of token ids a step, the batches cycled (schedule.finetune's loop). The teacher runs
in eval mode without gradients and is never changed."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsageError
from ..modeling import eval_mode
from .blocks import accepts, input_device


def logits(model: nn.Module, token_ids: Tensor) -> Tensor:
    """A causal LM's logits [batch, tokens, vocabulary] for token ids, without the KV cache."""
    extra = {"use_cache": False} if accepts(model, "use_cache") else {}
    return model(input_ids=token_ids.to(input_device(model)), **extra).logits


def kl_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """τ² · KL(softmax(teacher / τ) ‖ softmax(student / τ)), averaged over the tokens, in float32."""
    if student.shape != teacher.shape:
        raise UsageError(
            f"the student's logits {tuple(student.shape)} and the `teacher`'s {tuple(teacher.shape)} differ: "
            "distillation needs the same vocabulary"
        )
    vocab = student.shape[-1]
    s = F.log_softmax(student.float().reshape(-1, vocab) / temperature, dim=-1)
    t = F.log_softmax(teacher.float().reshape(-1, vocab).to(s.device) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def _check(student: nn.Module, teacher: nn.Module, batches, steps, lr, temperature, weight_decay) -> list[Tensor]:
    if student is teacher:
        raise UsageError("`teacher` must be another model than the student (the dense model before pruning)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"`steps` must be a positive int, got {steps!r}")
    for name, value in (("lr", lr), ("temperature", temperature)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise UsageError(f"`{name}` must be a finite number > 0, got {value!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise UsageError(f"`weight_decay` must be a number >= 0, got {weight_decay!r}")
    batches = [batches] if isinstance(batches, Tensor) else list(batches)
    if not batches:
        raise UsageError("`batches` is empty: distillation needs at least one batch of token ids")
    for i, ids in enumerate(batches):
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.shape[1] < 1:
            shown = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise UsageError(f"`batches`[{i}] must be token ids [sequences, tokens] (an integer tensor), got {shown}")
    return batches


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Tensor | Sequence[Tensor],
    *,
    steps: int,
    lr: float = 1e-4,
    temperature: float = 1.0,
    weight_decay: float = 0.0,
) -> list[float]:
    """Fine-tunes `student` in place to match `teacher`'s next-token distributions (module docstring).

    Args:
        student: the pruned causal LM, trained in place (train mode during the loop, its own mode after).
        teacher: the dense causal LM with the same vocabulary; run in eval mode, without gradients,
            never changed.
        batches: token ids [sequences, tokens] (one tensor, or a list of them: one a step, cycled), e.g.
            `llm.calibration_windows(tokens, n, seq_len).split(batch_size)`.
        steps: AdamW steps, >= 1.
        lr: the learning rate, > 0.
        temperature: τ of the softened distributions, > 0.
        weight_decay: AdamW's, >= 0.

    Returns:
        The loss of each step.

    Raises:
        UsageError (a ValueError) naming the argument, before anything is touched: the teacher is the
        student, steps not a positive int, lr or temperature not > 0, no batches or not token ids,
        vocabularies that differ (at the first step, nothing trained yet)."""
    from ..schedule import finetune

    batches = _check(student, teacher, batches, steps, lr, temperature, weight_decay)

    def loss_fn(student_logits: Tensor, token_ids: Tensor) -> Tensor:
        with torch.no_grad(), eval_mode(teacher):
            target = logits(teacher, token_ids)
        return kl_loss(student_logits, target, temperature)

    losses = finetune(
        student,
        [(ids, ids) for ids in batches],
        steps,
        loss_fn=loss_fn,
        forward=logits,
        lr=float(lr),
        weight_decay=float(weight_decay),
    )
    student.zero_grad(set_to_none=True)
    return losses
