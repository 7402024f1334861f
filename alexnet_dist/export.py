"""``python -m alexnet_dist.export RUN_DIR OUT.pt``: the whole network as one file, for inference.

Merges every tower's weights from the newest complete checkpoint of RUN_DIR into a
file of tensors and plain values that :meth:`alexnet_dist.model.AlexNet.load` reads
(no DeepSpeed needed there, and loading runs no pickled code): the weights, the class
names and the preprocessing the network was trained with. :func:`classify` uses them:

    python -c "from alexnet_dist.export import classify; print(classify('net.pt', 'photo.jpg'))"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from alexnet_dist.checkpoint import CheckpointError, Checkpoints, merged_model_state, network_args
from alexnet_dist.metrics import say

__all__ = ["classify", "export", "main"]


def export(run_dir: str | Path, out: str | Path) -> Path:
    """Write RUN_DIR's newest complete checkpoint to ``out``; return the checkpoint used."""
    path = Checkpoints(run_dir).newest()
    if path is None:
        raise CheckpointError(f"no complete checkpoint under {Path(run_dir) / 'checkpoints'}")
    state, meta = merged_model_state(path)
    torch.save({"model": network_args(meta), "state_dict": state, "step": meta["step"],
                "classes": meta.get("classes"), "preprocess": meta.get("preprocess")}, out)
    return path


def classify(model_file: str | Path, image: str | Path, top: int = 5) -> list[tuple[str, float]]:
    """The ``top`` classes of one image file and their probabilities, by the exported
    network with its own preprocessing (shorter side resized, centre crop, normalised)."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    from alexnet_dist.model import AlexNet

    net = AlexNet.load(str(model_file))
    prep = net.preprocess
    if prep is None:
        raise CheckpointError(f"{model_file} records no preprocessing: export it again from its run directory")
    with Image.open(image) as im:
        x = TF.to_tensor(TF.center_crop(TF.resize(im.convert("RGB"), prep["resize"]), prep["crop"]))
    x = TF.normalize(x, prep["mean"], prep["std"])[None]
    with torch.no_grad():
        probs = net(x).softmax(1)[0]
    best = probs.topk(min(top, len(probs)))
    return [(net.classes[i], p) for p, i in zip(best.values.tolist(), best.indices.tolist())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m alexnet_dist.export", description="Write the whole network of a run as one file, for inference.",
        epilog="The file holds the weights, the class names and the preprocessing; "
               "AlexNet.load(OUT) returns the network in eval mode.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run's run.dir (its newest complete checkpoint)")
    parser.add_argument("out", metavar="OUT.pt", help="the file to write")
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
