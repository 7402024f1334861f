"""``python -m alexnet_dist.viz RUN_DIR_OR_MODEL_FILE [--out DIR]``: pictures of a run.

Writes into DIR (default: the run directory, or the model file's folder):

* ``filters.png``: each tower's conv1 kernels as a grid, the towers side by side as in
  the paper's figure 3, each kernel min-max normalised on its own; the titles give each
  tower's mean colour saturation (:func:`kernel_saturation`), which is also printed.
* ``curves.png``: training and validation loss, learning rate, top-1 and top-5 against
  step, from ``RUN_DIR/metrics.jsonl`` (skipped for an exported model file).

The input is a run directory (its newest complete checkpoint) or a file written by
``python -m alexnet_dist.export``. :func:`plot_bench` draws the chart of
``python -m alexnet_dist.bench --plot``. Figures are drawn on matplotlib's Agg canvas
through the object API; pyplot is never imported, so nothing needs a display.
"""

from __future__ import annotations

import argparse
import math
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from alexnet_dist.checkpoint import Checkpoints, load_network
from alexnet_dist.metrics import read_records
from alexnet_dist.model import AlexNet

__all__ = [
    "Source",
    "VizError",
    "grid_shape",
    "kernel_grid",
    "kernel_saturation",
    "load_source",
    "main",
    "normalised_kernels",
    "plot_bench",
    "plot_curves",
    "plot_filters",
    "read_metrics",
    "tower_kernels",
]

METRICS = "metrics.jsonl"
GAP = 2  # white pixels between kernels in filters.png
TRAIN_KEYS = ("step", "loss", "lr")
VAL_KEYS = ("step", "loss", "top1", "top5")
# What reading a model file or checkpoint can raise when the file is not one.
_READ_ERRORS = (OSError, RuntimeError, ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError)
Record = dict[str, Any]


class VizError(Exception):
    """A user error; the message is the one line printed."""


@dataclass(frozen=True)
class Source:
    """What is drawn: a network, named in titles, and its run's metrics (None for a model file)."""

    model: AlexNet
    name: str  # the run directory's or the file's
    step: int | None  # of the checkpoint; None for a model file
    metrics: tuple[list[Record], list[Record]] | None

    @property
    def label(self) -> str:
        """The name, with the step where there is one."""
        return self.name if self.step is None else f"{self.name}, step {self.step}"


def _one_line(e: BaseException, limit: int = 200) -> str:
    """The exception's message on one line, cut at ``limit`` characters."""
    if isinstance(e, pickle.UnpicklingError):  # torch's message suggests unsafe loading
        return "not a PyTorch file of tensors"
    if isinstance(e, KeyError):
        return f"missing key {e.args[0]!r}"
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.1, h_pad=0.1)
    FigureCanvasAgg(fig)
    return fig


# ---------------------------------------------------------------- reading


def load_source(path: Path) -> Source:
    """The network in a run directory's newest complete checkpoint, or in an exported file."""
    if not path.exists():
        raise VizError(f"{path}: no such file or directory")
    if path.is_dir():
        return _load_run_dir(path)
    try:
        return Source(AlexNet.load(str(path)), path.name, None, None)
    except _READ_ERRORS as e:
        raise VizError(f"{path} is not a model file from alexnet_dist.export: {_one_line(e)}") from None


def _load_run_dir(run_dir: Path) -> Source:
    metrics = read_metrics(run_dir / METRICS)
    newest = Checkpoints(run_dir).newest()
    if newest is None:
        raise VizError(f"{run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}")
    try:
        model, meta = load_network(newest)
        step = meta["step"]
    except _READ_ERRORS as e:
        raise VizError(f"cannot read checkpoint {newest}: {_one_line(e)}") from None
    return Source(model, run_dir.resolve().name, step, metrics)


def _checked(record: Any, keys: tuple[str, ...], where: str) -> Record:
    missing = [k for k in keys if not isinstance(record, dict) or k not in record]
    if missing:
        raise VizError(f"{where}: not a metrics record (missing {', '.join(missing)})")
    return record


def read_metrics(path: Path) -> tuple[list[Record], list[Record]]:
    """(training records, validation records) of a ``metrics.jsonl``.

    Records with a ``split`` other than ``val`` are left out, and so is a last line
    without its newline (a live run writing it).
    """
    if not path.is_file():
        raise VizError(f"{path}: no such file (training writes it from its first logged step)")
    try:
        records = read_records(path)
    except OSError as e:
        raise VizError(f"cannot read {path}: {_one_line(e)}") from None
    except ValueError as e:
        raise VizError(str(e)) from None
    train: list[Record] = []
    val: list[Record] = []
    for number, record in records:
        where = f"{path}:{number}"
        split = record.get("split")
        if split is None:
            train.append(_checked(record, TRAIN_KEYS, where))
        elif split == "val":
            val.append(_checked(record, VAL_KEYS, where))
    if not train and not val:
        raise VizError(f"{path} has no records yet")
    return train, val


# ---------------------------------------------------------------- kernels and saturation


def tower_kernels(model: AlexNet) -> list[np.ndarray]:
    """Each tower's conv1 weights as an ``n x k x k x 3`` array, towers in order."""
    towers = sorted(model.towers.values(), key=lambda t: t.index)
    return [t.features[0].weight.detach().float().permute(0, 2, 3, 1).cpu().numpy() for t in towers]


def normalised_kernels(kernels: np.ndarray) -> np.ndarray:
    """Min-max normalise each kernel of ``n x k x k x 3`` on its own (RGB together) to [0, 1].

    A constant kernel becomes mid grey.

    >>> normalised_kernels(np.array([[[[-2.0, 0.0, 2.0]]]])).tolist()
    [[[[0.0, 0.5, 1.0]]]]
    """
    low = kernels.min(axis=(1, 2, 3), keepdims=True)
    span = kernels.max(axis=(1, 2, 3), keepdims=True) - low
    out = np.full(kernels.shape, 0.5)
    np.divide(kernels - low, span, out=out, where=np.broadcast_to(span > 0, kernels.shape))
    return out


def kernel_saturation(kernels: np.ndarray) -> np.ndarray:
    """Colour saturation of each kernel of ``n x k x k x 3`` (raw weights): the number behind figure 3.

    Each kernel is min-max normalised on its own to [0, 1], as drawn
    (:func:`normalised_kernels`). A pixel's saturation is its chroma,
    max(R, G, B) - min(R, G, B), which is HSV saturation times value: unlike
    (max - min) / max it does not blow up at near-black pixels. A kernel's saturation
    is the mean over its k*k pixels; a tower's is the mean over its kernels.

    0 for a grey kernel (R = G = B at every pixel); at most 1 (every pixel a pure
    colour at full strength). A red Gaussian blob (sigma 3 px) on a black 11x11 kernel
    scores about 0.4; an untrained tower (N(0, 0.01) weights) about 0.3.

    >>> grey = np.random.default_rng(0).normal(size=(1, 11, 11, 1)).repeat(3, axis=3)
    >>> red = np.zeros((1, 11, 11, 3)); red[0, 3:8, 3:8, 0] = 1.0
    >>> kernel_saturation(np.concatenate([grey, red])).round(3).tolist()
    [0.0, 0.207]
    """
    rgb = normalised_kernels(kernels)
    return (rgb.max(axis=3) - rgb.min(axis=3)).mean(axis=(1, 2))


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, columns) of a grid of ``n`` kernels, about 4:3 landscape.

    >>> grid_shape(48), grid_shape(12), grid_shape(6), grid_shape(1)
    ((6, 8), (3, 4), (2, 3), (1, 1))
    """
    rows = max(1, math.isqrt(n * 3 // 4))
    return rows, math.ceil(n / rows)


def kernel_grid(rgb: np.ndarray) -> np.ndarray:
    """Tile normalised kernels (``n x k x k x 3``) row by row into one image, white between."""
    n, k = rgb.shape[:2]
    rows, cols = grid_shape(n)
    cell = k + GAP
    image = np.ones((rows * cell - GAP, cols * cell - GAP, 3))
    for i, kernel in enumerate(rgb):
        r, c = divmod(i, cols)
        image[r * cell : r * cell + k, c * cell : c * cell + k] = kernel
    return image


# ---------------------------------------------------------------- pictures


def _draw_tower(ax: Axes, kernels: np.ndarray, tower: int, saturation: float) -> None:
    n, k = kernels.shape[:2]
    rows, cols = grid_shape(n)
    cell = k + GAP
    ax.imshow(kernel_grid(normalised_kernels(kernels)), interpolation="nearest")
    ax.set_xticks([c * cell + (k - 1) / 2 for c in range(cols)], [f"+{c}" for c in range(cols)])
    ax.set_yticks([r * cell + (k - 1) / 2 for r in range(rows)], [str(r * cols) for r in range(rows)])
    ax.tick_params(length=0, labelsize=8, colors="0.35")
    ax.spines[:].set_visible(False)
    ax.set_title(f"tower {tower} ({n} kernels)\nmean saturation {saturation:.3f}", fontsize=11)


def plot_filters(model: AlexNet, path: Path, label: str) -> list[float]:
    """Draw every tower's conv1 kernels side by side into ``path``; return each tower's saturation."""
    kernels = tower_kernels(model)
    saturations = [float(kernel_saturation(k).mean()) for k in kernels]
    rows, cols = grid_shape(len(kernels[0]))
    width = max(0.6 * cols, 3.2)  # inches per tower
    fig = _figure(len(kernels) * (width + 0.6), width * rows / cols + 1.6)
    fig.get_layout_engine().set(wspace=0.06)
    axes = fig.subplots(1, len(kernels), squeeze=False)[0]
    for tower, (ax, k, saturation) in enumerate(zip(axes, kernels, saturations)):
        _draw_tower(ax, k, tower, saturation)
    fig.suptitle(f"conv1 kernels, each min-max normalised ({label})", fontsize=12)
    fig.supxlabel("kernel index = row label + column label;  saturation = mean over pixels of "
                  "max(R,G,B) - min(R,G,B)", fontsize=8, color="0.35")
    fig.savefig(path)
    return saturations


def _series(records: list[Record], key: str) -> tuple[np.ndarray, np.ndarray]:
    return np.array([r["step"] for r in records], float), np.array([r[key] for r in records], float)


def _loss_panel(ax: Axes, train: list[Record], val: list[Record]) -> None:
    steps, loss = _series(train, "loss")
    window = len(loss) // 25
    ax.plot(steps, loss, color="C0", alpha=0.35 if window > 1 else 1.0, lw=1, label="train")
    if window > 1:
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color="C0", lw=2, label=f"train, mean of {window}")
    if val:
        ax.plot(*_series(val, "loss"), "o-", color="C3", ms=4, label="validation")
    ax.set(title="loss", ylabel="cross-entropy")
    ax.legend(fontsize=8)


def _lr_panel(ax: Axes, train: list[Record]) -> None:
    steps, lr = _series(train, "lr")
    ax.plot(steps, lr, color="C2", lw=1.5)
    # Log scale for drops by 10 (the paper's schedule); linear for warm-up, cosine to 0.
    if len(lr) and lr.min() > 0 and 10 * lr[lr.argmax():].min() <= lr.max():
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.set(title="learning rate", ylabel="lr")


def _accuracy_panel(ax: Axes, val: list[Record]) -> None:
    for key, colour in (("top1", "C1"), ("top5", "C4")):
        ax.plot(*_series(val, key), "o-", color=colour, ms=4, label=f"top-{key[-1]}")
    if val:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no validation records yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(0, 1.02)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set(title="validation accuracy", ylabel="accuracy")


def plot_curves(train: list[Record], val: list[Record], path: Path, name: str) -> None:
    """Loss, learning rate, top-1 and top-5 against step, three panels side by side."""
    fig = _figure(15, 4.4)
    loss_ax, lr_ax, acc_ax = fig.subplots(1, 3, sharex=True)
    _loss_panel(loss_ax, train, val)
    _lr_panel(lr_ax, train)
    _accuracy_panel(acc_ax, val)
    for ax in (loss_ax, lr_ax, acc_ax):
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
        ax.grid(alpha=0.3)
    last = max(r["step"] for r in train + val)
    fig.suptitle(f"{name}: to step {last}, {len(train)} training and {len(val)} validation records", fontsize=12)
    fig.savefig(path)


def _bench_rows(result: dict[str, Any]) -> dict[str, float]:
    rows = {name: float(r["images_per_sec"]) for name, r in result.get("variants", {}).items()}
    rows = rows or {"project": float(result["images_per_sec"])}
    baseline = result.get("baseline_images_per_sec")
    if baseline is not None and float(baseline) not in rows.values():
        rows["baseline"] = float(baseline)
    return rows


def _bench_label(name: str, value: float, result: dict[str, Any]) -> tuple[str, str]:
    """(bar label, colour): the project's headline variant blue, the baseline grey."""
    for role, key, colour in (("project", "images_per_sec", "C0"), ("baseline", "baseline_images_per_sec", "0.6")):
        if value == result.get(key):
            return (name if name == role else f"{name} ({role})"), colour
    return name, "#9ecae1"


def plot_bench(result: dict[str, Any], path: Path) -> None:
    """Horizontal bars of images/s per variant of a benchmark result (``bench --plot``).

    The variant that is the project's headline number is blue, the baseline grey;
    the title gives their ratio when the result has a baseline.
    """
    rows = _bench_rows(result)
    names, colours = zip(*(_bench_label(n, v, result) for n, v in rows.items()))
    fig = _figure(8, 1.4 + 0.55 * len(rows))
    ax = fig.subplots()
    bars = ax.barh(names, list(rows.values()), color=colours)
    ax.bar_label(bars, fmt="{:,.1f}", padding=3, fontsize=9)
    ax.invert_yaxis()
    ax.margins(x=0.15)
    ax.set_xlabel("images / s")
    title = f"bench {result['what']}"
    if result.get("baseline_images_per_sec"):
        title += f": project / baseline = {result['images_per_sec'] / result['baseline_images_per_sec']:.2f}x"
    ax.set_title(title + (f"\n{result['device']}" if "device" in result else ""), fontsize=11)
    ax.spines[["top", "right"]].set_visible(False)
    fig.savefig(path)


# ---------------------------------------------------------------- command line


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m alexnet_dist.viz",
                                description="Draw a run: filters.png (conv1 of each tower) and curves.png.")
    p.add_argument("path", type=Path, help="a run directory (run.dir) or a file from alexnet_dist.export")
    p.add_argument("--out", type=Path, help="folder for the PNGs (default: the run directory or the file's folder)")
    return p.parse_args(argv)


def _draw(source: Source, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    saturations = plot_filters(source.model, out / "filters.png", source.label)
    for tower, s in enumerate(saturations):
        print(f"tower {tower}: mean conv1 saturation {s:.3f}")
    print(f"wrote {out / 'filters.png'}")
    if source.metrics is None:
        print("skipped curves.png: a model file has no metrics (give the run directory)")
        return
    plot_curves(*source.metrics, out / "curves.png", source.name)
    print(f"wrote {out / 'curves.png'}")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        source = load_source(args.path)
        _draw(source, args.out or (args.path if args.path.is_dir() else args.path.parent))
    except VizError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write pictures: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
