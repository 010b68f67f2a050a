"""llm.distill: the logit KL written out here, the loss of a width-pruned tiny Llama going down against
its dense teacher, the teacher never changed, and bad arguments refused by name before anything is
trained."""

import copy

import pytest
import torch

from pyprune_fast import llm
from pyprune_fast.errors import UsageError
from pyprune_fast.llm.distill import kl_loss

transformers = pytest.importorskip("transformers")
from tests.test_llm_models import VOCAB, tiny_causal_lm  # noqa: E402


def batches(count=2, rows=2, tokens=16):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (rows, tokens), generator=g) for _ in range(count)]


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_the_loss_is_the_tokens_mean_kl_of_the_teacher_to_the_student_times_tau_squared(temperature):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    p = torch.softmax(teacher.double() / temperature, -1)
    q = torch.softmax(student.double() / temperature, -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean() * temperature**2
    torch.testing.assert_close(kl_loss(student, teacher, temperature).double(), expected, rtol=1e-5, atol=1e-6)
    assert float(kl_loss(teacher, teacher, temperature)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_lowers_the_loss_of_a_pruned_model_and_leaves_the_teacher_as_it_was():
    teacher = tiny_causal_lm("llama")
    student = copy.deepcopy(teacher)
    llm.prune_structured(student, torch.cat(batches(4)).flatten(), ratio=0.4, num_samples=4, seq_len=16, progress=False)
    before, flags = state(teacher), [p.requires_grad for p in teacher.parameters()]
    student_before = state(student)
    losses = llm.distill(student, teacher, batches(), steps=30, lr=3e-3)
    assert len(losses) == 30 and all(loss >= 0 for loss in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    after = state(teacher)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in teacher.parameters()] == flags
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    assert all(p.grad is None for p in student.parameters()) and not student.training
    assert any(not torch.equal(student_before[k], v) for k, v in state(student).items())


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"steps": True}, "steps"),
        ({"steps": 2, "lr": 0}, "lr"),
        ({"steps": 2, "lr": float("nan")}, "lr"),
        ({"steps": 2, "temperature": -1.0}, "temperature"),
        ({"steps": 2, "weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_bad_arguments_are_refused_by_name_before_anything_is_trained(options, name):
    teacher, student = tiny_causal_lm("llama"), tiny_causal_lm("llama", seed=1)
    before = state(student)
    with pytest.raises(UsageError, match=name) as info:
        llm.distill(student, teacher, batches(), **options)
    assert name in info.value.parameters
    assert all(torch.equal(before[k], v) for k, v in state(student).items())


def test_the_student_as_its_own_teacher_no_batches_and_other_vocabularies_are_refused():
    teacher, student = tiny_causal_lm("llama"), tiny_causal_lm("llama", seed=1)
    with pytest.raises(UsageError, match="teacher"):
        llm.distill(student, student, batches(), steps=1)
    with pytest.raises(UsageError, match="batches"):
        llm.distill(student, teacher, [], steps=1)
    with pytest.raises(UsageError, match="batches"):
        llm.distill(student, teacher, [torch.randn(2, 4)], steps=1)
    other = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(vocab_size=VOCAB + 4, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    )
    before = state(student)
    with pytest.raises(UsageError, match="same vocabulary"):
        llm.distill(student, other, batches(), steps=1)
    assert all(torch.equal(before[k], v) for k, v in state(student).items())
