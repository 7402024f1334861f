"""The network in one process: sizes, LRN, initialisation, dropout seeding."""

import pytest
import torch
from torch import nn

from alexnet_dist.model import AlexNet, LocalResponseNorm, TowerDropout, class_split


def test_full_size_parameter_count_and_logits():
    model = AlexNet()
    assert sum(p.numel() for p in model.parameters()) == 60_965_224
    assert model(torch.randn(2, 3, 224, 224)).shape == (2, 1000)


def test_full_size_per_tower_shapes_match_the_paper():
    model = AlexNet()
    tower = model.towers["tower0"]
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
             for m in tower.features if isinstance(m, (nn.Conv2d, nn.MaxPool2d))]
    model(torch.randn(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    assert shapes == [
        (48, 55, 55), (48, 27, 27),     # conv1, pool
        (128, 27, 27), (128, 13, 13),   # conv2, pool
        (192, 13, 13), (192, 13, 13),   # conv3, conv4
        (128, 13, 13), (128, 6, 6),     # conv5, pool
    ]
    fc = [m for m in tower.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in fc] == [(2 * 4608, 2048), (4096, 2048), (4096, 500)]


def test_width_mult_scales_every_width_and_odd_class_counts_split():
    model = AlexNet(num_classes=5, width_mult=0.25)
    t0, t1 = model.towers["tower0"], model.towers["tower1"]
    convs = [m.out_channels for m in t0.features if isinstance(m, nn.Conv2d)]
    assert convs == [12, 32, 48, 48, 32]
    assert t0.classifier[-1].out_features == 3 and t1.classifier[-1].out_features == 2
    assert model(torch.randn(3, 3, 64, 64)).shape == (3, 5)
    assert class_split(7) == (4, 3)


def test_lrn_worked_example_by_hand():
    a = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    # size 3, alpha 1, beta 1, k 1: windows {0,1}, {0,1,2}, {1,2}
    # sums of squares 5, 14, 13 -> b = 1/(1+5), 2/(1+14), 3/(1+13)
    b = LocalResponseNorm(size=3, alpha=1.0, beta=1.0, k=1.0)(a).flatten()
    torch.testing.assert_close(b, torch.tensor([1 / 6, 2 / 15, 3 / 14]))
    # The paper's constants: every window of 5 covers all 3 channels here.
    b = LocalResponseNorm()(a).flatten()
    torch.testing.assert_close(b, a.flatten() / (2.0 + 1e-4 * 14) ** 0.75)


def test_lrn_alpha_is_not_divided_by_size():
    x = torch.randn(2, 16, 5, 5)
    ours = LocalResponseNorm(size=5, alpha=1e-2, beta=0.75, k=2.0)(x)
    torch_lrn = nn.LocalResponseNorm(size=5, alpha=1e-2 * 5, beta=0.75, k=2.0)(x)
    torch.testing.assert_close(ours, torch_lrn)
    assert not torch.allclose(ours, nn.LocalResponseNorm(5, 1e-2, 0.75, 2.0)(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lrn_in_half_precision_matches_float64(dtype):
    # conv1-like ReLU outputs: 96 channels, values up to ~400, whose squares overflow
    # fp16 and whose channel running sums bf16 cannot difference.
    x = (torch.randn(2, 96, 7, 7, dtype=torch.float64).relu() * 150).to(dtype)
    ref = LocalResponseNorm()(x.double())
    out = LocalResponseNorm()(x)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    err = (out.double() - ref).norm() / ref.norm()
    assert err < 1e-2, f"relative error {err:.3g} in {dtype}"


def test_paper_init():
    model = AlexNet(width_mult=0.25)
    layers = [m for m in model.towers["tower1"].layers() if isinstance(m, (nn.Conv2d, nn.Linear))]
    biases = [float(m.bias.detach().mean()) for m in layers]
    assert biases == [0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    for m in layers:
        assert abs(float(m.weight.detach().std()) - 0.01) < 0.002
        assert abs(float(m.weight.detach().mean())) < 0.002


def test_kaiming_init_and_unknown_scheme():
    model = AlexNet(width_mult=0.25, init="kaiming")
    conv1 = model.towers["tower0"].features[0]
    fan_in = 3 * 11 * 11
    assert abs(float(conv1.weight.detach().std()) - (2 / fan_in) ** 0.5) < 0.01
    with pytest.raises(ValueError, match="unknown init scheme"):
        AlexNet(width_mult=0.25, init="xavier")


def _masks(model: AlexNet, seed: int, replica: int, step: int) -> dict[str, torch.Tensor]:
    model.train()
    model.reseed_dropout(seed, replica, step)
    out = {}
    for name, tower in model.towers.items():
        for i, drop in enumerate(m for m in tower.layers() if isinstance(m, TowerDropout)):
            out[f"{name}.{i}"] = drop(torch.ones(4, 64)) != 0
    return out


def test_dropout_masks_differ_between_towers_and_replicas_and_repeat_from_the_seed():
    model = AlexNet(num_classes=4, width_mult=0.125)
    a = _masks(model, seed=1, replica=0, step=5)
    assert not torch.equal(a["tower0.0"], a["tower1.0"])
    assert not torch.equal(a["tower0.0"], a["tower0.1"])
    b = _masks(model, seed=1, replica=1, step=5)
    assert not torch.equal(a["tower0.0"], b["tower0.0"])
    c = _masks(model, seed=1, replica=0, step=6)
    assert not torch.equal(a["tower0.0"], c["tower0.0"])
    again = _masks(AlexNet(num_classes=4, width_mult=0.125), seed=1, replica=0, step=5)
    assert all(torch.equal(a[k], again[k]) for k in a)
    kept = torch.cat([m.float().flatten() for m in a.values()]).mean()
    assert 0.35 < kept < 0.65


def test_cross_tower_marker_refuses_to_run_alone():
    with pytest.raises(RuntimeError, match="runs inside AlexNet"):
        AlexNet(num_classes=4, width_mult=0.125).towers["tower0"].features[8](torch.ones(1))
