"""``python -m alexnet_dist.export RUN_DIR OUT.pt``: the whole network as one file.

Merges every tower's weights from the newest complete checkpoint of RUN_DIR into a
file that :meth:`alexnet_dist.model.AlexNet.load` reads (no DeepSpeed needed there).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from alexnet_dist.checkpoint import CheckpointError, Checkpoints, merged_model_state
from alexnet_dist.metrics import say

__all__ = ["export", "main"]


def export(run_dir: str | Path, out: str | Path) -> Path:
    """Write RUN_DIR's newest complete checkpoint to ``out``; return the checkpoint used."""
    path = Checkpoints(run_dir).newest()
    if path is None:
        raise CheckpointError(f"no complete checkpoint under {Path(run_dir) / 'checkpoints'}")
    state, meta = merged_model_state(path)
    model = dict(num_classes=meta["num_classes"], width_mult=meta["width_mult"], dropout=meta["dropout"])
    torch.save({"model": model, "state_dict": state, "step": meta["step"]}, out)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    try:
        used = export(args.run_dir, args.out)
    except (CheckpointError, OSError) as e:
        say(f"error: {e}", sys.stderr)
        return 2
    say(f"wrote {args.out} from {used}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
