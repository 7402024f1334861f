"""The configuration: dataclasses with validation, one YAML file, ``--set`` overrides.

``load_config(path, overrides)`` reads ``configs/default.yaml`` (or ``path``), applies
``--set a.b=value`` overrides (values parsed as YAML), and validates every field: a
key that does not exist, or a value of the wrong type, is one clear error naming it.
The DeepSpeed JSON is generated from here (:func:`deepspeed_config`), never kept
beside it.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "Config", "ConfigError", "DataConfig", "ModelConfig", "RunConfig", "TrainConfig",
    "DEFAULT_CONFIG", "deepspeed_config", "gradient_accumulation", "load_config", "parse_overrides", "reference_markdown", "torch_dtype",
]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A bad configuration; its message is the one line the user sees."""


@dataclass
class DataConfig:
    """Input: folders, augmentation, DALI."""

    train_dir: str | None = None  # ImageFolder root, or a pack (data_pipeline.pack); unset: the built-in demo data set
    val_dir: str | None = None  # ImageFolder root or pack evaluated each epoch; unset with the demo set: its val split
    on_bad_file: Literal["error", "skip"] = "error"  # undecodable files: stop and name them, or leave them out
    augment: bool = True  # the paper's random crop, flip and PCA colour noise
    image_size: int = 224  # crop side
    resize: int = 256  # shorter side before cropping
    pca: str | None = None  # eigen file from `python -m data_pipeline.pca`; unset: ImageNet's
    ten_crop_eval: bool = False  # evaluate with the paper's 10 views instead of the centre crop
    num_threads: int = 2  # DALI CPU threads per rank
    prefetch: int = 2  # DALI prefetch queue depth
    decode_ahead: int = 0  # batches read and decoded ahead on a worker thread per feed; 0: on the training thread
    scan: bool = True  # check every file decodes before training (cached)
    cache_dir: str = "~/.cache/alexnet-dist"  # demo data set and scan cache
    synthetic: bool = False  # generated batches, no files and no DALI (smoke tests, throughput); no validation

    def validate(self) -> None:
        _positive(self, "image_size", "resize", "num_threads", "prefetch")
        if self.decode_ahead < 0:
            raise ConfigError(f"data.decode_ahead must be at least 0, got {self.decode_ahead}")
        if self.resize < self.image_size:
            raise ConfigError(f"data.resize ({self.resize}) must be at least data.image_size ({self.image_size})")


@dataclass
class ModelConfig:
    num_classes: int | None = None  # default: the number of class folders
    width_mult: float = 1.0  # 1.0 = the paper's widths
    dropout: float = 0.5  # after fc6 and fc7, as in the paper
    init: Literal["paper", "kaiming"] = "paper"  # paper: N(0, 0.01), biases 1 in conv2/4/5, fc6/7
    parallel: Literal["towers", "hybrid"] = "towers"  # towers: one tower per rank; hybrid: data-parallel convolutions, classifier split by neurons over model.hybrid_size ranks (Krizhevsky 2014)
    hybrid_size: int = 2  # parallel=hybrid: ranks sharing one classifier (even; divides the world size)

    def validate(self) -> None:
        if self.parallel == "hybrid" and (self.hybrid_size < 2 or self.hybrid_size % 2):
            raise ConfigError(f"model.hybrid_size must be even and at least 2, got {self.hybrid_size}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ConfigError(f"model.num_classes must be at least 2, got {self.num_classes}")
        if not 0 < self.width_mult <= 4:
            raise ConfigError(f"model.width_mult must be in (0, 4], got {self.width_mult}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TrainConfig:
    micro_batch_size: int = 128  # images per data-parallel replica per step
    grad_accum: int = 1  # micro batches per optimizer step
    global_batch_size: int | None = None  # images per optimizer step whatever the layout (grad_accum derived)
    max_steps: int | None = None  # optimizer steps; stop at this or train.epochs, whichever first
    epochs: int = 90  # passes over the training set
    seed: int = 0  # same seed, config and layout: same losses
    lr: float = 0.01  # SGD learning rate (before warm-up and scaling)
    lr_scale_batch: int | None = None  # scale lr linearly by global_batch / this (unset: no scaling)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # L2 penalty, on every weight as in the paper
    schedule: Literal["plateau", "step", "cosine", "constant"] = "plateau"  # plateau: lr / 10 when val error stalls
    warmup_steps: int = 0  # linear warm-up from lr / warmup_steps
    step_epochs: list[int] = field(default_factory=lambda: [30, 60, 80])  # schedule=step: lr / 10 at these epochs
    plateau_patience: int = 1  # epochs without val improvement before lr /= 10
    max_lr_drops: int = 3  # the paper divided the lr by 10 three times
    grad_clip: float = 0.0  # 0 = off
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"  # fp16 (loss scaling; needs zero_stage 1) or bf16 (fp32 weights, autocast)
    zero_stage: Literal[0, 1] = 0  # DeepSpeed ZeRO stage (1: optimizer state sharded over replicas)
    exchange_chunks: int = 1  # >1: split the micro batch to overlap exchanges with compute
    eval_every_epochs: int = 1  # validation every this many epochs (and at the end)

    @property
    def torch_dtype(self):
        """The torch dtype of ``precision`` (:func:`torch_dtype`)."""
        return torch_dtype(self.precision)

    def validate(self) -> None:
        _positive(self, "micro_batch_size", "grad_accum", "epochs", "eval_every_epochs", "exchange_chunks")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be positive, got {self.max_steps}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ConfigError(f"train.global_batch_size must be positive, got {self.global_batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("train.warmup_steps and train.grad_clip must not be negative")
        if self.precision == "fp16" and self.zero_stage == 0:
            # DeepSpeed 0.19's engine scales the loss only for ZeRO optimizers, while its
            # stage-0 fp16 optimizer still divides the gradients by the loss scale: on a GPU
            # the network did not learn where bf16 did (docs/BENCHMARKS.md).
            raise ConfigError("train.precision=fp16 needs train.zero_stage=1 (DeepSpeed's stage-0 fp16 "
                              "optimizer shrinks every update by its loss scale); or use bf16")


@dataclass
class RunConfig:
    dir: str = "runs/default"  # metrics.jsonl, config.yaml, checkpoints/
    checkpoint_every: int = 100  # steps; 0 = only at the end and on SIGTERM
    keep_last: int = 2  # complete checkpoints kept besides the best
    log_every: int = 10  # steps between progress lines (metrics.jsonl has every step)
    evaluate_only: bool = False  # evaluate the newest checkpoint of run.dir and stop
    tensorboard: bool = False  # DeepSpeed's monitors, written under run.dir/monitor
    csv_monitor: bool = False  # DeepSpeed's CSV monitor, under run.dir/monitor
    collective_timeout_s: float = 300.0  # seconds; a stuck collective fails after this

    def validate(self) -> None:
        if self.checkpoint_every < 0 or self.keep_last < 1 or self.log_every < 1:
            raise ConfigError("run.checkpoint_every must be >= 0, run.keep_last and run.log_every >= 1")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> Config:
        for section in (self.data, self.model, self.train, self.run):
            section.validate()
        if self.model.parallel == "hybrid" and self.train.exchange_chunks > 1:
            raise ConfigError("train.exchange_chunks overlaps the towers' exchanges: it needs model.parallel=towers "
                              "(set it to 1 with hybrid)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def gradient_accumulation(train: TrainConfig, replicas: int) -> int:
    """Micro batches per optimizer step on ``replicas`` replicas: ``train.grad_accum``, or what
    keeps ``train.global_batch_size`` images per step (global = micro x accumulation x replicas).

    >>> t = TrainConfig(micro_batch_size=4, global_batch_size=16)
    >>> [gradient_accumulation(t, r) for r in (1, 2, 4)]
    [4, 2, 1]
    >>> gradient_accumulation(t, 3)
    Traceback (most recent call last):
    ...
    alexnet_dist.config.ConfigError: train.global_batch_size=16 cannot be reached on 3 replicas with train.micro_batch_size=4: it must be a multiple of 4 x 3 = 12; choose a train.micro_batch_size that divides 16 / 3, or another layout
    """
    if train.global_batch_size is None:
        return train.grad_accum
    per_step = train.micro_batch_size * replicas
    accum, rest = divmod(train.global_batch_size, per_step)
    if rest or not accum:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} cannot be reached on {replicas} "
            f"replica{'s' if replicas > 1 else ''} with train.micro_batch_size={train.micro_batch_size}: it must be "
            f"a multiple of {train.micro_batch_size} x {replicas} = {per_step}; choose a train.micro_batch_size that "
            f"divides {train.global_batch_size} / {replicas}, or another layout")
    if train.grad_accum not in (1, accum):
        raise ConfigError(f"train.grad_accum={train.grad_accum} and train.global_batch_size="
                          f"{train.global_batch_size} disagree on {replicas} replicas (it needs {accum}): set one")
    return accum


def torch_dtype(precision: str):
    """The torch dtype a precision's batches are fed in (and the bench computes in)."""
    import torch  # here only: the config itself needs no torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _positive(section: Any, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 1:
            raise ConfigError(f"{_section_name(section)}.{name} must be at least 1, got {getattr(section, name)}")


def _section_name(section: Any) -> str:
    return type(section).__name__.removesuffix("Config").lower()


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Return ``value`` if it fits ``hint`` (ints widen to floats), else raise ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _check_type(key, value, arg)
            except ConfigError:
                pass
    elif origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}; got {value!r}")
    elif origin is list:
        if isinstance(value, list):
            return [_check_type(key, v, args[0]) for v in value]
    elif hint is type(None):
        if value is None:
            return None
    elif hint is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):  # YAML 1.1 reads 1e-3 as a string
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number; got {value!r}")
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, hint):
        return value
    raise ConfigError(f"{key} must be {_describe(hint)}; got {value!r}")


def _describe(hint: Any) -> str:
    args = typing.get_args(hint)
    if args:
        return " or ".join(_describe(a) for a in args)
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (keys in {where}: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(f"{prefix}{name}", value, hint)
    return cls(**kwargs)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.max_steps=20", ...]`` -> nested dict with YAML-parsed values."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} needs the form key=value, e.g. --set train.max_steps=20")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({e.problem})") from None
        node = tree
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r} conflicts with an earlier --set of {part}")
        node[leaf] = value
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (default: configs/default.yaml), apply ``--set`` overrides, validate."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    return _build(Config, _merge(values, parse_overrides(list(overrides))), "").validate()


def deepspeed_config(cfg: Config, data_parallel_size: int, group_size: int = 1) -> dict[str, Any]:
    """The DeepSpeed JSON for this config (the optimizer and schedule stay ours). ``group_size``:
    input replicas whose images one data-parallel rank's gradient covers (``model.hybrid_size``
    in the hybrid layout, whose data-parallel ranks are groups)."""
    t = cfg.train
    accum = gradient_accumulation(t, data_parallel_size * group_size)
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size * group_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.micro_batch_size * group_size * accum * data_parallel_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,  # plain SGD under ZeRO
        "steps_per_print": 10**9,  # progress is ours
        "wall_clock_breakdown": False,
    }
    if t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    elif t.precision == "bf16":
        # fp32 weights and bf16 compute, through DeepSpeed's torch.autocast: its "bf16" mode
        # (bf16 weights, fp32 master copies) checks each gradient for overflow with a host
        # sync, which bf16 never needs; the rates measured: docs/BENCHMARKS.md.
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    monitor_dir = str(Path(cfg.run.dir) / "monitor")
    if cfg.run.tensorboard:
        ds["tensorboard"] = {"enabled": True, "output_path": monitor_dir, "job_name": "alexnet"}
    if cfg.run.csv_monitor:
        ds["csv_monitor"] = {"enabled": True, "output_path": monitor_dir, "job_name": "alexnet"}
    return ds


_FIELD_LINE = re.compile(r"^\s+(\w+): [^=]+= (.+?)(?:\s+#\s*(.*))?$")


def reference_markdown() -> str:
    """The configuration reference (README.md): every key, its default and its comment,
    read from the dataclasses' source so it cannot drift from them."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        defaults = dataclasses.asdict(cls())
        for line in inspect.getsource(cls).splitlines():
            m = _FIELD_LINE.match(line)
            if m and m.group(1) in defaults:
                rows.append(f"| `{section.name}.{m.group(1)}` | `{yaml.safe_dump(defaults[m.group(1)], default_flow_style=True).strip().removesuffix('...').strip()}` | {m.group(3) or ''} |")
    return "\n".join(rows)


README_MARKERS = ("<!-- config-reference:start -->", "<!-- config-reference:end -->")


def readme_with_reference(text: str) -> str:
    """``text`` (README.md) with the reference between its markers regenerated."""
    start, end = README_MARKERS
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{reference_markdown()}\n{end}{tail}"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m alexnet_dist.config",
        description="Print the configuration reference (every key, its default and meaning) as a markdown table.")
    parser.add_argument("readme", nargs="?", metavar="README.md",
                        help="rewrite the reference in this file, between its config-reference markers, instead")
    args = parser.parse_args(argv)
    if args.readme is None:
        sys.stdout.write(reference_markdown() + "\n")
        return 0
    readme = Path(args.readme)
    try:
        text = readme.read_text()
        if README_MARKERS[0] not in text or README_MARKERS[1] not in text:
            raise ConfigError(f"{readme} has no {README_MARKERS[0]} ... {README_MARKERS[1]} markers")
        readme.write_text(readme_with_reference(text))
    except OSError as e:
        sys.stderr.write(f"error: {readme}: {e.strerror}\n")
        return 2
    except ConfigError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
