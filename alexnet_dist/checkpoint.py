"""Checkpoints through DeepSpeed, made safe to resume from.

Layout: ``run.dir/checkpoints/step00000100/`` holds DeepSpeed's files (one
``mp_rank_XX_model_states.pt`` per tower position, optimizer states), ``meta.json``
(what the checkpoint was made with) and, last of all, ``COMPLETE``. Only directories
with ``COMPLETE`` are ever resumed from, so a save cut off half way (a killed job, a
full disk) leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from alexnet_dist.distributed import ReportedOnRank0, is_rank0
from alexnet_dist.exchanges import barrier, broadcast_object
from alexnet_dist.metrics import say
from alexnet_dist.model import AlexNet
from data_pipeline.fsutil import write_atomically

__all__ = ["CheckpointError", "Checkpoints", "LAYOUT_KEYS", "load_network", "merged_model_state", "network_args"]

COMPLETE = "COMPLETE"
META = "meta.json"
# What must match between a checkpoint and the run resuming from it.
LAYOUT_KEYS = ("num_classes", "width_mult", "tower_parallel_size", "data_parallel_size")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is the one line the user sees."""


class Checkpoints:
    """The checkpoints of one run directory."""

    def __init__(self, run_dir: str | Path, keep_last: int = 2) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    @staticmethod
    def tag(step: int) -> str:
        return f"step{step:08d}"

    def complete(self) -> list[Path]:
        """Complete checkpoint directories, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if (p / COMPLETE).is_file())

    def newest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def incomplete(self) -> list[Path]:
        """Checkpoint directories a save did not finish (a killed job, a full disk), oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and not (p / COMPLETE).is_file())

    def newest_incomplete(self) -> Path | None:
        partial = self.incomplete()
        return partial[-1] if partial else None

    def save(self, engine, step: int, client_state: dict[str, Any], meta: dict[str, Any], best: bool) -> Path:
        """Save on every rank; mark complete and prune on rank 0 once all ranks wrote."""
        tag = self.tag(step)
        path = self.root / tag
        try:
            engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        except OSError as e:
            shutil.rmtree(path, ignore_errors=True)  # a partial save would keep a full disk full
            raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}") from None
        barrier()  # every tower's files are on disk before the checkpoint counts
        if is_rank0():
            write_atomically(str(path / META), json.dumps({**meta, "step": step, "best": best}, indent=1))
            write_atomically(str(path / COMPLETE), "")
            self._prune(best_tag=tag if best else None)
        barrier()
        return path

    def _prune(self, best_tag: str | None) -> None:
        best_file = self.root / "best"
        if best_tag:
            write_atomically(str(best_file), best_tag)
        keep = {p.name for p in self.complete()[-self.keep_last:]}
        if best_file.is_file():
            keep.add(best_file.read_text().strip())
        for p in self.root.iterdir():
            if p.is_dir() and p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def load(self, engine, layout: dict[str, Any]) -> tuple[Path, dict[str, Any]] | None:
        """Resume ``engine`` from the newest complete checkpoint whose files are whole;
        (its directory, its client state), or None when there is none. Collective.

        Global rank 0 checks the candidates (a checkpoint is only complete once every
        rank's files are on the shared run.dir), falling back to older ones with one
        line each; every rank loads its choice. What an unfinished save left is pruned
        by the next checkpoint.
        """
        path = broadcast_object(self._choose(layout) if is_rank0() else None)
        if isinstance(path, CheckpointError):
            raise path if is_rank0() else ReportedOnRank0(str(path))
        if path is None:
            return None
        try:
            _, client_state = engine.load_checkpoint(str(self.root), tag=path.name)
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path} does not load on this rank: {' '.join(str(e).split())[:200]}")
        if client_state is None:
            raise CheckpointError(f"checkpoint {path} has no files for this rank's tower")
        return path, client_state

    def _choose(self, layout: dict[str, Any]) -> Path | CheckpointError | None:
        """Rank 0's pick: the newest complete checkpoint that passes :func:`damage`."""
        done = self.complete()
        for path in reversed(done):
            try:
                check_layout(path, layout)  # another network or layout: the user's to fix, not to skip
            except CheckpointError as e:
                return e
            problem = damage(path)
            if problem is None:
                return path
            say(f"checkpoint {path.name} is damaged ({problem}): "
                + ("trying the one before it" if path != done[0] else "no older one is left"))
        if done:
            return CheckpointError(f"no checkpoint under {self.root} is whole: start with another run.dir, "
                                   "or remove the damaged ones to start from scratch")
        return None


def damage(path: Path) -> str | None:
    """What is wrong with a complete checkpoint's files (a few words), or None when each
    one reads back whole: torch's files are zip archives, so a truncated one has no
    central directory and a corrupted one fails its CRC."""
    files = sorted(path.glob("*.pt"))
    if not files:
        return "no model files"
    for f in files:
        try:
            with zipfile.ZipFile(f) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile) as e:
            return f"{f.name}: {' '.join(str(e).split()) or 'unreadable'}"
        if bad is not None:
            return f"{f.name}: {bad} fails its checksum"
    return None


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has no readable {META}: {e}") from None


def check_layout(path: Path, layout: dict[str, Any]) -> None:
    meta = read_meta(path)
    for key in LAYOUT_KEYS:
        if meta.get(key) != layout[key]:
            raise CheckpointError(
                f"checkpoint {path} was made with {key}={meta.get(key)}, this run has {key}={layout[key]}; "
                "use the same model and world layout, or another run.dir"
            )


def merged_model_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The whole network's state dict from one checkpoint directory (every tower's file).

    Read with ``weights_only=True``: a run directory written by someone else (shared
    storage, a download) cannot run code here. A file that needs more than tensors and
    plain values is refused in one line.
    """
    files = sorted(path.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"no model states in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            module = torch.load(f, map_location="cpu", weights_only=True)["module"]
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            raise CheckpointError(f"{f} holds more than tensors and plain values "
                                  f"({found[1] if found else 'objects'}): not loaded, since loading it could run "
                                  "code; a checkpoint of this version of alexnet-dist needs nothing more") from None
        state.update({k: v.float() for k, v in module.items()})
    return state, read_meta(path)


def network_args(meta: dict[str, Any]) -> dict[str, Any]:
    """The :class:`AlexNet` arguments that rebuild a checkpoint's network."""
    return dict(num_classes=meta["num_classes"], width_mult=meta["width_mult"], dropout=meta["dropout"])


def load_network(path: Path) -> tuple[AlexNet, dict[str, Any]]:
    """The whole network of one checkpoint directory, in eval mode, and the checkpoint's meta."""
    state, meta = merged_model_state(path)
    model = AlexNet(**network_args(meta))
    model.load_state_dict(state)
    return model.eval(), meta
