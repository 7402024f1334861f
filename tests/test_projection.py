"""The projection's bytes are the bench's counted bytes, at 2 and 4 ranks (its time model is
checked against measured steps in docs/BENCHMARKS.md, not here: timing is the bench's job)."""

import pytest

from alexnet_dist.bench.projection import LABEL_BYTES, Net, exchange_bytes, step_collectives
from tests.test_bench import TINY


def _counted(variant: str, ranks: int, *extra: str) -> dict[str, float]:
    """Bytes one rank sent per step, by exchange name, in one timed step of the bench's variant."""
    from alexnet_dist.bench.__main__ import BENCH_CONFIG
    from alexnet_dist.bench.model import run_variant
    from alexnet_dist.config import load_config

    cfg = load_config(str(BENCH_CONFIG), [*TINY, *extra])
    result = run_variant(variant, ranks, cfg, 1000, steps=1, warmup=1)
    images = result["exchange_bytes_per_step"] / result["exchange_bytes_per_image"]  # a replica's or a group's
    return {name: round(per_image * images) for name, per_image in result["exchange_bytes_by_name"].items()}


@pytest.mark.parametrize("ranks", [2, 4])
def test_the_towers_bytes_are_the_counted_bytes(ranks):
    # TINY: width 1/8, 64 px, 8 images per replica: 4 images' worth per GPU
    model = exchange_bytes(step_collectives("towers", Net.of(0.125, 1000, 64), ranks, 4))
    assert model == _counted("tower_parallel", ranks)


@pytest.mark.parametrize("ranks, k", [(2, 2), (4, 4)])
def test_the_hybrid_bytes_are_the_counted_bytes(ranks, k):
    model = exchange_bytes(step_collectives("hybrid", Net.of(0.125, 1000, 64), ranks, 4, k))
    assert model.pop("targets") == (k - 1) * 4 * LABEL_BYTES  # the bench gathers its labels once, before timing
    assert model == _counted("hybrid", ranks, f"model.hybrid_size={k}")


def test_the_gradient_averages_span_the_replicas_and_the_groups():
    net = Net.of()
    grads = {c.name: c for c in step_collectives("hybrid", net, 64, 128) if c.gradient}
    assert {c.members for c in grads.values()} == {8}  # 64 ranks, groups of 8
    assert grads["gradients.fc"].size == 58_631_144 // 8 * 4  # a share of fc6..fc8, fp32
    (towers,) = [c for c in step_collectives("towers", net, 64, 128) if c.gradient]
    assert (towers.members, towers.per_node, towers.size) == (32, 4, 60_965_224 // 2 * 4)
    (ddp,) = step_collectives("ddp", net, 64, 128)
    assert (ddp.members, ddp.per_node, ddp.size) == (64, 8, 61_100_840 * 4)
