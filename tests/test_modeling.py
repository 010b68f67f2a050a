"""pyprune_fast.modeling: the model utilities every path shares put a model back exactly as it was."""

import pytest
import torch
from torch import nn

from pyprune_fast import modeling


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))


def test_eval_mode_restores_each_modules_own_flag():
    net = _net()
    net.train()
    net[2].eval()  # a mixed state: only the dropout in eval mode
    before = [m.training for m in net.modules()]
    with modeling.eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert [m.training for m in net.modules()] == before


def test_eval_mode_restores_on_error():
    net = _net().train()
    with pytest.raises(RuntimeError, match="inside"), modeling.eval_mode(net):
        raise RuntimeError("inside")
    assert all(m.training for m in net.modules())


def test_restored_puts_parameters_and_buffers_back_bit_for_bit():
    net = _net().train()
    net(torch.randn(16, 4))  # running statistics become non-trivial
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="boom"), modeling.restored(net):
        with torch.no_grad():
            net[0].weight.zero_()
            net[1].running_mean.fill_(7.0)
        raise ValueError("boom")
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_restored_names_only_those_and_refuses_unknown_names():
    net = _net()
    w0, w3 = net[0].weight.detach().clone(), net[3].weight.detach().clone()
    with modeling.restored(net, ["0.weight"]), torch.no_grad():
        net[0].weight.zero_()
        net[3].weight.zero_()
    assert torch.equal(net[0].weight, w0)
    assert not torch.equal(net[3].weight, w3) and not net[3].weight.any()
    with pytest.raises(ValueError, match=r"names not in the model's state_dict\(\): \['nope'\]"):
        with modeling.restored(net, ["nope"]):
            pass


def test_preserved_restores_requires_grad_and_modes():
    net = _net().train()
    net[3].weight.requires_grad_(False)
    with modeling.preserved(net, [net[3].weight]):
        assert torch.is_grad_enabled() and net[3].weight.requires_grad and not net.training
    assert not net[3].weight.requires_grad and net[0].weight.requires_grad and net.training
