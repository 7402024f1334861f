"""train.py end to end with real processes on CPU: the launchers, the equivalence
promise, resume, export and the user errors."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alexnet_dist.checkpoint import Checkpoints, merged_model_state
from alexnet_dist.model import AlexNet
from tests.launch import EXACT, check, losses, records, train


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _close(a: list[float], b: list[float], rel: float = 1e-4) -> None:
    assert len(a) == len(b), (a, b)
    for x, y in zip(a, b):
        assert math.isclose(x, y, rel_tol=rel), (a, b)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, cache):
    run = tmp_path_factory.mktemp("ds2")
    check(train("deepspeed", 2, run, *EXACT, "train.max_steps=4", cache=cache))
    return run


def test_deepspeed_two_ranks_writes_the_contract_outputs(two_rank_run):
    train_lines = records(two_rank_run)
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4]
    assert set(train_lines[0]) == {"step", "epoch", "loss", "lr", "images_per_sec"}
    val = records(two_rank_run, "val")
    assert val and set(val[-1]) == {"step", "split", "loss", "top1", "top5"}
    assert 0 <= val[-1]["top1"] <= val[-1]["top5"] <= 1
    assert (two_rank_run / "config.yaml").is_file()
    assert Checkpoints(two_rank_run).newest() is not None


def test_a_run_leaves_no_shared_memory_behind(tmp_path, cache):
    """DeepSpeed's CPU all-reduce maps a 69 MB /dev/shm file per rank (RAM); every run
    used to leave its files there."""
    def buffers() -> set[Path]:
        return set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))

    before = buffers()
    check(train("deepspeed", 2, tmp_path, "train.max_steps=1", cache=cache))
    assert buffers() - before == set()


# Where glibc's malloc puts a 30 MiB block and whether it keeps it once freed, in a
# fresh process that starts torch.distributed on the CPU (argv[1] "init") or not.
_WHERE_A_FREED_BLOCK_GOES = """
import ctypes, sys
from alexnet_dist.distributed import LaunchInfo, init_distributed
if sys.argv[1] == "init":
    init_distributed(LaunchInfo(0, 1, 0, "127.0.0.1", 0, "single"))
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype = MallInfo2, ctypes.c_void_p
size, mapped = 30 << 20, libc.mallinfo2().hblkhd
block = libc.malloc(size)
own_mapping = libc.mallinfo2().hblkhd - mapped >= size
libc.free(ctypes.c_void_p(block))
print(own_mapping, libc.mallinfo2().keepcost >= size)
"""


def test_a_cpu_rank_keeps_freed_memory_for_the_next_step():
    def block(mode: str) -> str:
        return subprocess.run([sys.executable, "-c", _WHERE_A_FREED_BLOCK_GOES, mode],
                              capture_output=True, text=True, check=True).stdout.split()

    assert block("plain") == ["True", "False"]  # glibc's default: its own mapping, unmapped when freed
    assert block("init") == ["False", "True"]  # in the heap, and kept there


def test_synthetic_data_trains_without_dali_or_a_data_set(tmp_path, monkeypatch):
    """What a GPU machine without DALI's wheel runs: DALI is made unimportable here."""
    shadow = tmp_path / "no_dali" / "nvidia"  # a regular package first on the path hides the installed one
    (shadow / "dali").mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    (shadow / "dali" / "__init__.py").write_text("raise ImportError('DALI is hidden by this test')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "no_dali"))
    run, cache = tmp_path / "run", tmp_path / "cache"
    hidden = train("python", 1, tmp_path / "files", "train.max_steps=1", cache=cache)
    assert hidden.returncode != 0 and "DALI is hidden by this test" in hidden.stderr
    check(train("deepspeed", 2, run, "data.synthetic=true", "model.num_classes=10", "train.max_steps=3",
                cache=cache))
    assert [r["step"] for r in records(run)] == [1, 2, 3] and all(math.isfinite(x) for x in losses(run))
    assert records(run, "val") == []


def test_single_process_equals_two_ranks(two_rank_run, tmp_path, cache):
    """CONTRACT's promise: both towers in one process compute exactly the 2-rank network."""
    check(train("python", 1, tmp_path, *EXACT, "train.max_steps=4", cache=cache))
    _close(losses(tmp_path), losses(two_rank_run))


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_four_ranks_equal_two_ranks_at_the_same_global_batch(zero_stage, two_rank_run, tmp_path, cache):
    """Also with ZeRO 1: optimizer state sharded over the two replicas, the same steps."""
    check(train("deepspeed", 4, tmp_path, *EXACT, "train.max_steps=4", "train.micro_batch_size=4",
                f"train.zero_stage={zero_stage}", cache=cache))
    _close(losses(tmp_path), losses(two_rank_run))


@pytest.mark.slow
def test_bf16_two_ranks_follow_the_fp32_losses(tmp_path, cache):
    """The bf16 path (the one GPUs train in: fp32 weights, bf16 compute) on two ranks. A large constant lr
    makes every update move the loss (step 2 jumps), so updates that a precision path
    shrank or dropped would not follow the fp32 run."""
    sets = [*EXACT, "train.max_steps=4", "train.lr=0.05", "train.warmup_steps=0", "train.schedule=constant"]
    runs = {p: tmp_path / p for p in ("fp32", "bf16")}
    for precision, run in runs.items():
        check(train("deepspeed", 2, run, *sets, f"train.precision={precision}", cache=cache))
    fp32, bf16 = losses(runs["fp32"]), losses(runs["bf16"])
    assert fp32[1] > 1.5 * fp32[0], fp32  # the first update moved the loss
    assert bf16 != fp32  # bf16 compute did happen (autocast rounds every layer's output)
    _close(bf16, fp32, rel=3e-2)


@pytest.mark.parametrize("launcher", ["torchrun", "mpirun"])
def test_other_launchers_give_the_same_losses(launcher, two_rank_run, tmp_path, cache):
    check(train(launcher, 2, tmp_path, *EXACT, "train.max_steps=4", cache=cache))
    _close(losses(tmp_path), losses(two_rank_run))


def test_resume_continues_the_same_loss_sequence(two_rank_run, tmp_path, cache):
    check(train("deepspeed", 2, tmp_path, *EXACT, "train.max_steps=2", cache=cache))
    resumed = check(train("deepspeed", 2, tmp_path, *EXACT, "train.max_steps=4", cache=cache))
    assert "resumed from step 2" in resumed.stdout
    _close(losses(tmp_path), losses(two_rank_run))


def _export_worker(rank: int, world: int, ckpt, x, out) -> None:
    from alexnet_dist.groups import TowerGroups

    state, meta = merged_model_state(ckpt)
    g = TowerGroups.from_world()
    model = AlexNet(meta["num_classes"], meta["width_mult"], 0.0, towers=g.towers, group=g.pair_group)
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()})
    torch.save(model.eval()(x), out / f"logits{rank}.pt")


def test_export_loads_into_alexnet_with_the_same_logits(two_rank_run, tmp_path):
    from alexnet_dist.export import main as export_main
    from tests.multiproc import run_ranks

    assert export_main([str(two_rank_run), str(tmp_path / "net.pt")]) == 0
    model = AlexNet.load(str(tmp_path / "net.pt"))
    assert not model.training  # ready for inference as loaded
    x = torch.randn(3, 3, 64, 64)
    run_ranks(2, _export_worker, Checkpoints(two_rank_run).newest(), x, tmp_path)
    want = torch.load(tmp_path / "logits0.pt")
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
    assert export_main([str(tmp_path / "nothing"), str(tmp_path / "x.pt")]) == 2


def test_an_exported_network_classifies_a_jpeg_with_its_class_names(two_rank_run, tmp_path, cache):
    from alexnet_dist.export import classify, export
    from data_pipeline.demo import DEMO_CLASSES

    export(two_rank_run, tmp_path / "net.pt")
    model = AlexNet.load(str(tmp_path / "net.pt"))
    assert model.classes == sorted(DEMO_CLASSES)
    assert model.preprocess == dict(resize=72, crop=64, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    jpeg = next(Path(cache).glob("demo-*/val/circle/*.jpg"))
    top = classify(tmp_path / "net.pt", jpeg, top=3)
    assert len(top) == 3 and {name for name, _ in top} <= set(DEMO_CLASSES)
    assert all(0 <= p <= 1 for _, p in top) and [p for _, p in top] == sorted((p for _, p in top), reverse=True)


@pytest.mark.parametrize("sets, message", [
    (["train.nonsense=1"], "unknown config key train.nonsense"),
    (["train.lr=fast"], "train.lr must be float"),
    (["data.train_dir=/no/such/folder"], "/no/such/folder"),
    (["train.precision=fp16"], "train.precision=fp16 needs train.zero_stage=1"),
])
def test_user_errors_are_one_line_and_non_zero(sets, message, tmp_path, cache):
    result = train("python", 1, tmp_path, *sets, cache=cache, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]


def test_odd_world_size_is_refused(tmp_path, cache):
    result = train("torchrun", 3, tmp_path, cache=cache, timeout=120)
    assert result.returncode != 0
    assert "world size 3 is odd" in result.stderr


def test_a_checkpoint_of_another_width_is_refused(two_rank_run, tmp_path, cache):
    import shutil

    shutil.copytree(two_rank_run / "checkpoints", tmp_path / "checkpoints")
    result = train("deepspeed", 2, tmp_path, *EXACT, "model.width_mult=0.25", "train.max_steps=6", cache=cache)
    assert result.returncode != 0
    assert "was made with width_mult=0.125, this run has width_mult=0.25" in result.stderr
