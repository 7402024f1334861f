"""The hybrid layout (``model.parallel: hybrid``) on real gloo processes: groups of K ranks,
data-parallel convolutions, the classifier split by neurons, compute exactly the
single-process network; a wrong backward is caught; groups of a larger world keep their
gradients apart until the data-parallel average, which is the whole batch's gradient.
End to end: train.py on 4 hybrid ranks gives the single process's losses (also clipped,
and under ZeRO 1), its checkpoints resume under towers and back, and impossible layouts
are one line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from alexnet_dist import exchanges
from alexnet_dist.exchanges import all_reduce_sum
from alexnet_dist.groups import HybridGroups
from alexnet_dist.hybrid import HybridAlexNet
from alexnet_dist.model import AlexNet
from alexnet_dist.topology import HybridTopology
from tests.launch import EXACT, check, losses, train
from tests.multiproc import run_ranks
from tests.reliability import dataset_cache, error_lines, interrupted_at
from tests.test_exchanges import STEPS, assert_rel

SMALL = dict(num_classes=5, width_mult=0.125, dropout=0.0)
IMAGES = 8


def _optimizer(params) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def _grads(model: AlexNet, x: torch.Tensor, y: torch.Tensor) -> dict:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def _towers(state: dict) -> dict[int, dict]:
    return {t: {k: v for k, v in state.items() if k.startswith(f"towers.tower{t}.")} for t in range(2)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process network: its first step on the whole batch (and on each half, the
    groups of 8 ranks), then its parameters after STEPS more SGD steps."""
    tmp = tmp_path_factory.mktemp("hybrid")
    torch.manual_seed(3)
    model = AlexNet(**SMALL, init="kaiming")
    x, y = torch.randn(IMAGES, 3, 67, 67), torch.randint(0, 5, (IMAGES,))
    torch.save({"state": model.state_dict(), "x": x, "y": y}, tmp / "ref.pt")
    half = IMAGES // 2
    ref = {"logits": model(x).detach(), "halves": [_grads(model, x[:half], y[:half]), _grads(model, x[half:], y[half:])],
           "grads": _grads(model, x, y)}
    opt, losses = _optimizer(model.parameters()), []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    ref["losses"], ref["params"] = losses, {k: p.detach().clone() for k, p in model.named_parameters()}
    return tmp, ref


def test_the_shares_and_the_convolutions_are_the_papers_parameters():
    parts = [HybridAlexNet(1000, 1.0, part=j, parts=4, seed=0) for j in range(4)]
    convs = sum(p.numel() for p in parts[0].towers.parameters())
    shares = sum(p.numel() for net in parts for name, p in net.named_parameters() if name.startswith("fc"))
    assert convs + shares == 60_965_224


@pytest.mark.parametrize("parts, message", [
    (6, "model.hybrid_size=6 does not divide the classifier's 512 neurons"),  # 2 x 256 at width 0.125
    (8, "model.hybrid_size=8 is more than the 5 classes"),
])
def test_a_group_the_classifier_cannot_be_split_over_is_refused(parts, message):
    with pytest.raises(ValueError, match=message):
        HybridAlexNet(**SMALL, parts=parts)


def test_dropout_masks_repeat_from_the_seed_and_differ_between_shares():
    masks = []
    for part in (0, 0, 1):
        net = HybridAlexNet(**{**SMALL, "dropout": 0.5}, part=part, parts=2)
        net.reseed_dropout(seed=1, replica=0, step=3)
        masks.append(net.drop6(torch.ones(4, 256)))
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


def _check_mpu(groups: HybridGroups, rank: int, world_size: int, size: int) -> None:
    """DeepSpeed's view: the group splits the network, the same share in every group holds the same weights."""
    assert (groups.get_model_parallel_rank(), groups.get_data_parallel_rank()) == (rank % size, rank // size)
    assert (groups.get_model_parallel_world_size(), groups.get_data_parallel_world_size()) == (size, world_size // size)
    share = torch.tensor([float(rank)])
    assert all_reduce_sum(share, groups.get_data_parallel_group()).item() == sum(range(rank % size, world_size, size))
    group = torch.tensor([float(rank)])
    first = size * (rank // size)
    assert all_reduce_sum(group, groups.get_model_parallel_group()).item() == sum(range(first, first + size))
    assert groups.train_input()["replica"] == rank and groups.val_input()["replica"] == rank // size


def _hybrid_worker(rank: int, world_size: int, tmp: Path, size: int, mode: str) -> None:
    """One rank of groups of ``size``: the first step's logits and gradients (the group's, then
    averaged over the groups as DeepSpeed does), STEPS SGD steps, all in the towers' form.
    ``mode``: "exact", "split" (every reduce-scatter a split) or "unsummed" (the convolutions'
    gradients not summed over the group)."""
    if mode == "split":
        exchanges._reduce_scatter_blocks = lambda blocks, group, name: exchanges._split(blocks, group, 0)
    elif mode == "unsummed":
        exchanges._all_reduce = lambda x, group, name: x
    ref = torch.load(tmp / "ref.pt")
    groups = HybridGroups(HybridTopology(world_size, size), rank)
    _check_mpu(groups, rank, world_size, size)
    model = HybridAlexNet(**SMALL, group=groups.hybrid_group)
    model.load_state_dict(model.from_towers(_towers(ref["state"])))
    n = IMAGES // world_size
    x, y = ref["x"][rank * n:(rank + 1) * n], ref["y"][rank * n:(rank + 1) * n]
    dp = groups.topology.data_parallel_size
    opt, out, losses = _optimizer(model.parameters()), {}, []
    for step in range(STEPS):
        opt.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits, groups.targets(y))
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        for p in model.parameters():  # DeepSpeed's average over the data-parallel group
            p.grad = all_reduce_sum(p.grad, groups.data_group) / dp
        if step == 0:
            out["logits"] = logits.detach()
            out["group_grads"] = model.to_towers(grads)
            out["grads"] = model.to_towers({k: p.grad for k, p in model.named_parameters()})
        opt.step()
        losses.append((all_reduce_sum(loss.detach(), groups.data_group) / dp).item())
    out["losses"] = losses
    out["params"] = model.to_towers({k: p.detach() for k, p in model.named_parameters()})
    torch.save(out, tmp / f"{mode}{size}-{world_size}-{rank}.pt")


def _ranks(tmp: Path, mode: str, size: int, world_size: int) -> list[dict]:
    run_ranks(world_size, _hybrid_worker, tmp, size, mode)
    return [torch.load(tmp / f"{mode}{size}-{world_size}-{r}.pt") for r in range(world_size)]


def _whole(towers: dict[int, dict]) -> dict:
    return {**towers[0], **towers[1]}


def _assert_all_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for name, value in want.items():
        assert_rel(got[name], value, msg=f"{what} {name}")


@pytest.mark.parametrize("size", [2, 4])
def test_one_group_equals_the_single_process_network(reference, size):
    tmp, ref = reference
    ranks = _ranks(tmp, "exact", size, size)
    for r in ranks:  # every rank holds the group's logits, bit for bit
        torch.testing.assert_close(r["logits"], ranks[0]["logits"], rtol=0, atol=0)
        _assert_all_close(_whole(r["grads"]), _whole(ranks[0]["grads"]), "the same on every rank:")
    assert_rel(ranks[0]["logits"], ref["logits"], msg="logits")
    assert_rel(torch.tensor(ranks[0]["losses"]), torch.tensor(ref["losses"]), msg="losses")
    _assert_all_close(_whole(ranks[0]["grads"]), ref["grads"], "gradient")
    _assert_all_close(_whole(ranks[0]["params"]), ref["params"], f"after {STEPS} steps")


@pytest.mark.parametrize("mode, layer", [("split", "towers.tower0.features.0.weight"),
                                         ("unsummed", "towers.tower1.features.13.weight")])
def test_a_wrong_backward_loses_gradient_and_is_caught(reference, mode, layer):
    """A split in place of a reduce-scatter (into fc6, fc7, fc8) drops the other shares'
    part of the gradient; convolutions not summed over the group keep only their own images'."""
    tmp, ref = reference
    got = _whole(_ranks(tmp, mode, 4, 4)[1]["grads"])
    assert_rel(got["towers.tower0.classifier.10.weight"], ref["grads"]["towers.tower0.classifier.10.weight"],
               msg="fc8, after the last exchange")
    err = (got[layer] - ref["grads"][layer]).norm() / ref["grads"][layer].norm()
    assert err > 0.1, f"{mode}: a wrong backward went unnoticed (relative error {err:.1e})"


def test_eight_ranks_two_groups_keep_their_gradients_apart_until_the_average(reference):
    tmp, ref = reference
    ranks = _ranks(tmp, "exact", 4, 8)
    for g in range(2):
        group = ranks[4 * g: 4 * g + 4]
        _assert_all_close(_whole(group[0]["group_grads"]), ref["halves"][g], f"group {g}'s own gradient")
        assert_rel(group[0]["logits"], ref["logits"][4 * g: 4 * g + 4], msg=f"group {g}'s logits")
    conv1 = "towers.tower0.features.0.weight"  # the halves' gradients differ: mixing them would show
    assert (ref["halves"][0][conv1] - ref["halves"][1][conv1]).norm() > 0.1 * ref["grads"][conv1].norm()
    for rank, r in enumerate(ranks):
        _assert_all_close(_whole(r["grads"]), ref["grads"], f"rank {rank}'s averaged gradient")
    assert_rel(torch.tensor(ranks[0]["losses"]), torch.tensor(ref["losses"]), msg="losses")
    _assert_all_close(_whole(ranks[5]["params"]), ref["params"], f"after {STEPS} steps")


# ---------------------------------------------------------------- train.py end to end

STEPS_RUN, AT = 6, 3
RUN = [*EXACT, "train.global_batch_size=16", "train.micro_batch_size=4", f"train.max_steps={STEPS_RUN}",
       f"run.checkpoint_every={AT}", "run.keep_last=5"]
HYBRID4 = ["model.parallel=hybrid", "model.hybrid_size=4"]
# A large lr under a small clip: every update is scaled by the gradient's norm, so a norm that
# counted the group's identical convolutions once per rank would change the losses (by 5e-4
# at step 2, seen with the convolutions marked model_parallel).
CLIPPED = ["train.lr=3", "train.grad_clip=0.1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return dataset_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    """Uninterrupted runs by (launcher, ranks, extra settings), made once each."""
    made: dict[tuple, Path] = {}

    def run(launcher: str, ranks: int, *sets: str) -> Path:
        key = (launcher, ranks, *sets)
        if key not in made:
            made[key] = tmp_path_factory.mktemp(f"{launcher}{ranks}")
            check(train(launcher, ranks, made[key], *RUN, *sets, cache=cache, timeout=400))
        return made[key]

    return run


def _same(a: list[float], b: list[float], rel: float = 1e-4) -> None:
    assert len(a) == len(b) == STEPS_RUN, (a, b)
    assert all(math.isclose(x, y, rel_tol=rel) for x, y in zip(a, b)), (a, b)


@pytest.mark.parametrize("sets", [[], CLIPPED, pytest.param([*CLIPPED, "train.zero_stage=1"], marks=pytest.mark.slow)],
                         ids=["default", "clipped", "zero1"])
def test_train_py_hybrid_gives_the_single_process_losses(sets, runs):
    single = [s for s in sets if not s.startswith("train.zero_stage")]  # ZeRO needs ranks to shard over
    _same(losses(runs("deepspeed", 4, *HYBRID4, *sets)), losses(runs("python", 1, *single)))


def test_hybrid_on_one_process_is_the_single_process_network(runs):
    _same(losses(runs("python", 1, *HYBRID4)), losses(runs("python", 1)), rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("written, resumed, says", [
    ((4, HYBRID4), (2, []), "resuming a checkpoint of 4 ranks on 2 ranks: model.parallel towers instead of hybrid"),
    ((2, []), (4, HYBRID4), "resuming a checkpoint of 2 ranks on 4 ranks: model.parallel hybrid instead of towers"),
    ((4, [*HYBRID4, *CLIPPED, "train.zero_stage=1"]), (1, CLIPPED), "resuming a checkpoint of 4 ranks on 1 process"),
], ids=["hybrid-to-towers", "towers-to-hybrid", "hybrid-zero1-to-1"])
def test_a_checkpoint_resumes_across_the_layouts_with_the_uninterrupted_losses(written, resumed, says, runs,
                                                                               tmp_path, cache):
    (ranks, sets), (new_ranks, new_sets) = written, resumed
    run = interrupted_at(runs("deepspeed", ranks, *sets), tmp_path / "run", AT)
    launcher = "python" if new_ranks == 1 else "deepspeed"
    result = check(train(launcher, new_ranks, run, *RUN, *new_sets, cache=cache, timeout=400))
    assert f"resumed from step {AT}" in result.stdout and says in result.stdout, result.stdout[-3000:]
    _same(losses(run), losses(runs("python", 1, *(s for s in new_sets if s in CLIPPED))))


@pytest.mark.parametrize("launcher, ranks, sets, message", [
    ("python", 1, ["model.parallel=hybrid", "model.hybrid_size=3"], "model.hybrid_size must be even and at least 2, got 3"),
    ("torchrun", 2, HYBRID4, "model.hybrid_size=4 does not divide the world size 2"),
    ("python", 1, ["model.parallel=hybrid", "train.exchange_chunks=2"], "train.exchange_chunks overlaps the towers'"),
])
def test_an_impossible_hybrid_layout_is_one_line(launcher, ranks, sets, message, tmp_path, cache):
    result = train(launcher, ranks, tmp_path, *sets, cache=cache, timeout=120)
    errors = error_lines(result.stdout + result.stderr)
    assert result.returncode != 0 and errors and all(message in e for e in errors), result.stderr[-3000:]
