"""The network learns real data: scikit-learn's handwritten digits (1,797 real 8x8 scans,
10 classes), upscaled to JPEGs in the ImageFolder layout, trained on 2 ranks at reduced
width. Centre crops only: a mirrored 2 is not a 2, so the paper's flips would be the
wrong augmentation here.

The learning rate sits well inside the stable range: at 0.02 the loss spikes in epoch 2
and the final top-1 depends on the seed (0.89 with seed 0, 0.97 with seed 1); at 0.01,
with the embedded default's gradient clipping (5.0), seeds 0 to 3 end at 0.973, 0.973,
0.977 and 0.977 (0.967 to 0.983 unclipped), so the 0.9 asserted has a margin of at
least 0.073 (torch 2.14.1, DeepSpeed 0.19.8, DALI 2.4.0, measured 2026-12-02)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from tests.launch import check, records, train


def _digits_folders(root) -> tuple[str, str]:
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    for n, i in enumerate(order):
        split = "val" if n < 300 else "train"
        folder = root / split / f"digit{digits.target[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels).convert("RGB").resize((72, 72), Image.BILINEAR).save(folder / f"{i}.jpg", quality=95)
    return str(root / "train"), str(root / "val")


@pytest.mark.slow
def test_reaches_high_validation_accuracy_on_real_digits(tmp_path):
    train_dir, val_dir = _digits_folders(tmp_path / "digits")
    run = tmp_path / "run"
    check(train(
        "deepspeed", 2, run, f"data.train_dir={train_dir}", f"data.val_dir={val_dir}",
        "data.augment=false", "model.width_mult=0.25", "model.init=kaiming", "train.micro_batch_size=32", "train.epochs=5",
        "train.lr=0.01", "train.schedule=cosine", "train.warmup_steps=20", "run.log_every=20",
        cache=tmp_path / "cache", timeout=900,
    ))
    val = records(run, "val")
    assert len(val) == 5
    assert val[-1]["top1"] >= 0.9, val
