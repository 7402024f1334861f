"""Checkpoints in the single-process network's form, made safe to resume from on any layout.

Layout: ``run.dir/checkpoints/step00000100/`` holds ``tower0.pt`` and ``tower1.pt`` (each
tower's whole fp32 weights and SGD momentum under the single-process names, written by the
rank holding that tower in replica 0; :mod:`alexnet_dist.engine_state` reads them out of
DeepSpeed whatever ZeRO stage shards them), ``state.pt`` (the loop: step, schedule, data
position, RNG, fp16 loss scale), ``meta.json`` (the network and the layout that wrote it)
and, last of all, ``COMPLETE``. Only directories with ``COMPLETE`` are resumed from, so a
save cut off half way (a killed job, a full disk) leaves the previous checkpoint as the
newest complete one. Nothing in the files names a rank, so one process, 2, 4 or 8 ranks,
ZeRO 0 or 1 all read any checkpoint; only the network itself must match.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alexnet_dist.distributed import ReportedOnRank0, is_rank0
from alexnet_dist.exchanges import barrier, broadcast_object
from alexnet_dist.metrics import say
from alexnet_dist.model import AlexNet
from alexnet_dist.topology import NUM_TOWERS
from data_pipeline.fsutil import write_atomically

__all__ = ["CheckpointError", "Checkpoints", "Loaded", "NETWORK_KEYS", "load_network", "merged_model_state",
           "network_args"]

COMPLETE = "COMPLETE"
META = "meta.json"
STATE = "state.pt"
# What must match between a checkpoint and the run resuming from it: the network itself.
NETWORK_KEYS = ("num_classes", "width_mult")


def tower_file(index: int) -> str:
    return f"tower{index}.pt"


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

    def save(self, step: int, towers: dict[int, dict], state: dict[str, Any], meta: dict[str, Any],
             best: bool) -> Path:
        """Write this rank's share of checkpoint ``step``: the files of ``towers`` (those this rank
        writes; may be empty) and, on rank 0, ``state``; mark it complete and prune once every
        rank wrote. Collective."""
        path = self.root / self.tag(step)
        try:
            path.mkdir(parents=True, exist_ok=True)
            for index, tower in towers.items():
                torch.save(tower, path / tower_file(index))
            if is_rank0():
                torch.save(state, path / STATE)
        except OSError as e:
            shutil.rmtree(path, ignore_errors=True)  # a partial save would keep a full disk full
            raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}") from None
        barrier()  # every tower's file is on disk before the checkpoint counts
        if is_rank0():
            write_atomically(str(path / META), json.dumps({**meta, "step": step, "best": best}, indent=1))
            write_atomically(str(path / COMPLETE), "")
            self._prune(best_tag=path.name if best else None)
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

    def load(self, network: dict[str, Any], towers: tuple[int, ...], device: torch.device) -> Loaded | None:
        """The newest complete checkpoint whose files are whole and whose network is ``network``
        (:data:`NETWORK_KEYS`), with the files of ``towers`` read onto ``device``; None when
        there is no checkpoint. Collective.

        Global rank 0 checks the candidates (a checkpoint is only complete once every
        rank's files are on the shared run.dir), falling back to older ones with one
        line each; every rank reads its choice. What an unfinished save left is pruned
        by the next checkpoint.
        """
        path = broadcast_object(self._choose(network) if is_rank0() else None)
        if isinstance(path, CheckpointError):
            raise path if is_rank0() else ReportedOnRank0(str(path))
        if path is None:
            return None
        try:
            return Loaded(path, read_meta(path), _read(path / STATE, device),
                          {t: _read(path / tower_file(t), device) for t in towers})
        except (OSError, RuntimeError, pickle.UnpicklingError) as e:
            raise CheckpointError(f"checkpoint {path} does not load on this rank: {' '.join(str(e).split())[:200]}")

    def _choose(self, network: dict[str, Any]) -> Path | CheckpointError | None:
        """Rank 0's pick: the newest complete checkpoint that passes :func:`damage`."""
        done = self.complete()
        for path in reversed(done):
            if any(path.glob("mp_rank_*_model_states.pt")):
                return CheckpointError(f"checkpoint {path} was written by an earlier version of alexnet-dist "
                                       "(DeepSpeed's own files): resume it with that version, or start with another "
                                       "run.dir (viz and export still read it)")
            try:
                check_network(path, network)  # another network: the user's to fix, not to skip
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


@dataclass
class Loaded:
    """A checkpoint as one rank reads it: its directory, meta.json, the loop's state and this rank's towers."""

    path: Path
    meta: dict[str, Any]
    state: dict[str, Any]
    towers: dict[int, dict[str, dict[str, torch.Tensor]]]


def _read(path: Path, device: torch.device) -> Any:
    """A checkpoint file, read with ``weights_only=True``: tensors and plain values only, so a
    run directory written by someone else (shared storage, a download) cannot run code here."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise CheckpointError(f"{path} holds more than tensors and plain values "
                              f"({found[1] if found else 'objects'}): not loaded, since loading it could run "
                              "code; a checkpoint of this version of alexnet-dist needs nothing more") from None


def damage(path: Path) -> str | None:
    """What is wrong with a complete checkpoint's files (a few words), or None when each
    one reads back whole: torch's files are zip archives, so a truncated one has no
    central directory and a corrupted one fails its CRC."""
    expected = [STATE, *(tower_file(t) for t in range(NUM_TOWERS))]
    if missing := [name for name in expected if not (path / name).is_file()]:
        return f"no {', '.join(missing)}"
    for name in expected:
        try:
            with zipfile.ZipFile(path / name) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile) as e:
            return f"{name}: {' '.join(str(e).split()) or 'unreadable'}"
        if bad is not None:
            return f"{name}: {bad} fails its checksum"
    return None


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has no readable {META}: {e}") from None


def check_network(path: Path, network: dict[str, Any]) -> None:
    meta = read_meta(path)
    for key in NETWORK_KEYS:
        if meta.get(key) != network[key]:
            raise CheckpointError(
                f"checkpoint {path} holds another network: it was made with {key}={meta.get(key)}, this run has "
                f"{key}={network[key]}; use the same model, or another run.dir"
            )


def merged_model_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The whole network's state dict from one checkpoint directory (every tower's file; the
    ``mp_rank_*_model_states.pt`` of earlier versions too) and its meta, read with
    ``weights_only=True``."""
    towers = sorted(path.glob("tower*.pt"))
    files = [(f, "weights") for f in towers] or [(f, "module") for f in sorted(path.glob("mp_rank_*_model_states.pt"))]
    if not files:
        raise CheckpointError(f"no model states in {path}")
    state: dict[str, torch.Tensor] = {}
    for f, key in files:
        state.update({k: v.float() for k, v in _read(f, torch.device("cpu"))[key].items()})
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
