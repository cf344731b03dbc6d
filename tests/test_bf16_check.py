"""reprod.toy.bf16_check: a step's bf16-autocast gradients against float32's, whole and by layer."""

from __future__ import annotations

import torch
import torch.nn as nn

from reprod.toy import bf16_check as bc


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1))
    net[0].weight.requires_grad_(False)                        # a frozen layer
    return net


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 8, 8, generator=g), torch.randint(0, 5, (2, 8, 8), generator=g)


def test_gradient_agreement_compares_the_same_step_twice():
    net, (images, labels) = _net(), _batch()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    r = bc.gradient_agreement(net, images, labels)
    assert abs(r["loss_fp32"] - r["loss_bf16"]) < 0.05 * r["loss_fp32"]
    assert 0.99 < r["cosine"] <= 1.0 + 1e-6 and not r["non_finite"]
    assert r["worst"] in {"0.bias", "2.weight", "2.bias"}       # trainable parameters only
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_layer_agreement_checks_every_convolution_and_leaves_the_model_as_it_was():
    net, (images, labels) = _net(), _batch()
    layers = bc.layer_agreement(net, images, labels)
    assert set(layers) == {"0", "2"}
    assert layers["0"]["shape"] == [2, 3, 8, 8] and layers["2"]["shape"] == [2, 8, 8, 8]
    for row in layers.values():
        assert max(row["output"], row["input_grad"], row["weight_grad"]) < bc.LAYER_TOLERANCE
    assert not net[0].weight.requires_grad and net[2].weight.requires_grad
    assert all(p.grad is None for p in net.parameters())
    assert not net[0]._forward_hooks and not net[2]._forward_hooks       # hooks removed
    out = net(images)                                                   # outputs untouched
    assert out.shape == (2, 5, 8, 8)


def test_relative_error_names_a_non_finite_result():
    assert bc._relative(torch.tensor([float("nan"), 1.0]), torch.ones(2)) == float("inf")
    assert bc._relative(torch.ones(3), torch.ones(3)) == 0.0
