"""The exchanges and the process layout on real gloo processes: the two-rank network
is exactly the single-process one, and the groups never mix the towers."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from alexnet_dist import exchanges
from alexnet_dist.exchanges import EXCHANGE_COUNTER, all_reduce_sum, gather_logits, start_gather_from_towers
from alexnet_dist.groups import TowerGroups
from alexnet_dist.model import AlexNet
from tests.multiproc import run_ranks

SMALL = dict(num_classes=5, width_mult=0.125, dropout=0.0)
STEPS = 3


def assert_rel(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5, msg: str = "") -> None:
    """Relative error of the whole tensor, ||got - want|| / ||want|| <= tol: immune to the
    element-wise noise of different summation orders on near-zero entries."""
    err = (got - want).norm() / want.norm().clamp_min(1e-30)
    assert err <= tol, f"{msg}: relative error {err:.2e} > {tol:.0e}"


def _train(model: AlexNet, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Logits, loss and gradients of the first step, then the losses of STEPS SGD steps."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    out = {"logits": logits.detach(), "grads": {k: p.grad.clone() for k, p in model.named_parameters()}}
    losses = [loss.item()]
    for _ in range(STEPS):
        opt.step()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
    out["losses"] = losses
    out["params"] = {k: p.detach().clone() for k, p in model.named_parameters()}
    return out


def _tower_worker(rank: int, world_size: int, tmp: Path, backward: str) -> None:
    """``backward``: the real exchanges, "split" (a wrong backward), or "chunked" (overlap on)."""
    if backward == "split":  # the classic bug: the backward of the gather as a plain split
        exchanges._reduce_scatter_blocks = lambda blocks, group, name: exchanges._split(blocks, group, 0)
    ref = torch.load(tmp / "ref.pt")
    groups = TowerGroups.from_world()
    chunks = 3 if backward == "chunked" else 1
    model = AlexNet(**SMALL, towers=groups.towers, group=groups.pair_group, exchange_chunks=chunks)
    mine = {k: v for k, v in ref["state"].items() if k in model.state_dict()}
    model.load_state_dict(mine, strict=True)
    torch.save(_train(model, ref["x"], ref["y"]), tmp / f"{backward}{rank}.pt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("equiv")
    torch.manual_seed(3)
    model = AlexNet(**SMALL, init="kaiming")
    x, y = torch.randn(6, 3, 67, 67), torch.randint(0, 5, (6,))
    torch.save({"state": model.state_dict(), "x": x, "y": y}, tmp / "ref.pt")
    return tmp, _train(model, x, y)


def _merged(tmp: Path, backward: str) -> dict:
    parts = [torch.load(tmp / f"{backward}{r}.pt") for r in range(2)]
    for p in parts:  # every rank sees the full logits
        torch.testing.assert_close(p["logits"], parts[0]["logits"], rtol=0, atol=0)
    return {
        "logits": parts[0]["logits"],
        "losses": parts[0]["losses"],
        "grads": {**parts[0]["grads"], **parts[1]["grads"]},
        "params": {**parts[0]["params"], **parts[1]["params"]},
    }


@pytest.mark.parametrize("mode", ["reduce_scatter", "chunked"])
def test_two_ranks_equal_the_single_process_network(reference, mode):
    tmp, ref = reference
    run_ranks(2, _tower_worker, tmp, mode)
    got = _merged(tmp, mode)
    assert_rel(got["logits"], ref["logits"], msg="logits")
    assert_rel(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), msg="losses")
    assert got["grads"].keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        assert_rel(got["grads"][name], g, msg=name)
    for name, p in ref["params"].items():
        assert_rel(got["params"][name], p, msg=name)


def test_a_split_backward_loses_gradient_and_is_caught(reference):
    tmp, ref = reference
    run_ranks(2, _tower_worker, tmp, "split")
    got = _merged(tmp, "split")
    assert_rel(got["logits"], ref["logits"], msg="logits")  # the forward is fine
    fc8 = "towers.tower0.classifier.10.weight"  # after the last exchange: unaffected
    assert_rel(got["grads"][fc8], ref["grads"][fc8], msg=fc8)
    conv1 = "towers.tower0.features.0.weight"
    err = (got["grads"][conv1] - ref["grads"][conv1]).norm() / ref["grads"][conv1].norm()
    assert err > 0.1, f"a split backward went unnoticed (relative error {err:.1e})"


def _function_worker(rank: int, world_size: int) -> None:
    group = TowerGroups.from_world().pair_group
    EXCHANGE_COUNTER.reset()
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    weights = [torch.arange(12.0).view(2, 6), -torch.arange(12.0).view(2, 6) ** 2]
    gathered = start_gather_from_towers([x], group, "t").wait()  # 2 x 3 per rank -> 2 x 6
    assert torch.equal(gathered, torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)], 1))
    (weights[rank] * gathered).sum().backward()
    # My slice feeds both ranks' own weights: its gradient is the sum of both.
    want = sum(w[:, 3 * rank: 3 * rank + 3] for w in weights)
    assert torch.equal(x.grad, want), (x.grad, want)
    assert EXCHANGE_COUNTER.bytes_sent == {"t": 2 * 3 * 4, "t.grad": 2 * 3 * 4}

    # Logits: each tower owns a class slice (3 and 2 of 5); the loss is the same on both.
    logits = torch.full((2, 3 - rank), float(rank), requires_grad=True)
    full = gather_logits([logits], group, (3, 2))
    assert full.shape == (2, 5) and torch.equal(full[:, 3:], torch.ones(2, 2))
    (full * torch.arange(5.0)).sum().backward()
    assert torch.equal(logits.grad, torch.arange(5.0)[[0, 1, 2] if rank == 0 else [3, 4]].expand(2, -1))


def test_gather_forward_reduce_scatter_backward_on_its_own():
    run_ranks(2, _function_worker)


def _groups_worker(rank: int, world_size: int) -> None:
    groups = TowerGroups.from_world()
    pair = [0] * 2
    dist.all_gather_object(pair, rank, group=groups.pair_group)
    replicas = [0] * 2
    dist.all_gather_object(replicas, rank, group=groups.get_data_parallel_group())
    assert pair == [rank - rank % 2, rank - rank % 2 + 1]
    assert replicas == [rank % 2, rank % 2 + 2]
    assert groups.towers == (rank % 2,)
    assert (groups.get_model_parallel_rank(), groups.get_data_parallel_rank()) == (rank % 2, rank // 2)
    assert (groups.get_model_parallel_world_size(), groups.get_data_parallel_world_size()) == (2, 2)
    # A "gradient" that is tower-specific: averaging over the data-parallel group must
    # only ever see the same tower.
    grad = torch.tensor([10.0 * (rank % 2) + rank])
    all_reduce_sum(grad, groups.get_data_parallel_group())
    assert grad.item() == (0 + 2 if rank % 2 == 0 else 11 + 13), grad


def test_four_ranks_two_pairs_groups_never_mix_towers():
    run_ranks(4, _groups_worker)
