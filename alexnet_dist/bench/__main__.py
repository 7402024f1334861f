"""``python -m alexnet_dist.bench {data,model,train} [--config F] [--set k=v ...] [--baseline] [--json OUT]``

The benchmark starts its own ranks (``--ranks``, default 2) on this machine; it prints
a markdown table, writes the result object (its keys: docs/ARCHITECTURE.md) to
``--json`` and, with ``--plot PNG``, a chart.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from alexnet_dist.config import ConfigError, load_config
from alexnet_dist.distributed import quiet_libraries
from alexnet_dist.metrics import say
from data_pipeline import DataError

BENCH_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "bench.yaml"


_MODES_HELP = {
    "data": "the DALI feed alone (decode, crop, flip, colour noise, normalise); --baseline: torchvision's "
            "DataLoader and its decode_jpeg on the same photographs",
    "model": "forward, backward and SGD step on generated input, tower-parallel and single-process; --baseline: "
             "torchvision's AlexNet under DDP and DeepSpeed's pipeline engine, same width and global batch",
    "train": "the trainer's own step end to end (JPEGs through DALI), against the same step fed from memory "
             "and a plain loop without DeepSpeed",
}


def _add_options(p: argparse.ArgumentParser, mode: str) -> None:
    p.add_argument("--config", default=str(BENCH_CONFIG), metavar="FILE",
                   help="YAML config (default: configs/bench.yaml, the paper's full size)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.width_mult=0.25 (repeatable; default: none)")
    p.add_argument("--baseline", action="store_true",
                   help="also measure the usual way of doing the same work, in the same run (default: off; "
                        "train always measures its comparisons)" if mode == "train" else
                   "also measure the usual way of doing the same work, in the same run (default: off)")
    p.add_argument("--json", metavar="OUT", help="also write the result as one JSON object to OUT (default: none)")
    p.add_argument("--plot", metavar="PNG", help="also draw the images/s of every variant into PNG (default: none)")
    if mode != "data":
        p.add_argument("--ranks", type=int, default=2,
                       help="ranks to start on this machine; 1 puts both towers on one device (default: 2)")
    else:
        p.add_argument("--epoch", action="store_true",
                       help="also time rank 0's start-up over the data set (listing and scan, or a packed set's "
                            "index) and read one whole epoch, counting the files opened and bytes read (default: off)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (default: 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    p.add_argument("--rounds", type=int, help="run the variants this many times in turn and report each one's median "
                   "round, so drift on the machine hits all alike (default: 3 for data --baseline, else 1)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m alexnet_dist.bench",
        description="Throughput of the two-tower AlexNet: prints a markdown table of every variant's images/s, "
                    "step times, exchange bytes, memory and TFLOP/s. 'python -m alexnet_dist.bench MODE --help' "
                    "lists a mode's options.")
    modes = p.add_subparsers(dest="what", required=True, metavar="MODE")
    for mode, text in _MODES_HELP.items():
        _add_options(modes.add_parser(mode, help=text, description=text), mode)
    args = p.parse_args(argv)
    args.ranks = getattr(args, "ranks", 1)  # data runs in this process
    return args


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def markdown_table(result: dict[str, Any]) -> str:
    rows = result.get("variants", {result["what"]: result})
    lines = ["| variant | images/s | median step s | p95 step s | exchange B/image | blocked in exchanges | peak MiB/rank "
             "| TFLOP/s |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        mem = r.get("peak_memory_mb_per_rank", [])
        median, p95 = r.get("median_step_s", float("nan")), r.get("p95_step_s", float("nan"))
        tflops = f"{r['tflops']:.3g}" if "tflops" in r else ""
        blocked = f"{100 * r['exchange_wait_share']:.1f} %" if "exchange_wait_share" in r else ""
        lines.append(
            f"| {name} | {r.get('images_per_sec', float('nan')):.1f} | {median:.3f} | {p95:.3f} "
            f"| {r.get('exchange_bytes_per_image', 0):.0f} | {blocked} | {', '.join(f'{m:.0f}' for m in mem)} | {tflops} |"
        )
    if "baseline_images_per_sec" in result and result["images_per_sec"] > 0:
        lines.append(f"\nratio (project / baseline): {result['images_per_sec'] / result['baseline_images_per_sec']:.2f}x")
    if "overlap_on_vs_off" in result:
        lines.append(f"exchanges overlapped / not: {result['overlap_on_vs_off']:.2f}x")
    if "peak_fraction" in result:
        lines.append(f"share of this device's measured {result['matmul_peak_precision']} matrix-product rate "
                     f"({result['matmul_peak_tflops']:.3g} TFLOP/s): {100 * result['peak_fraction']:.1f} %")
    if "end_to_end_vs_model_only" in result:
        lines.append(f"\nend to end / model only: {result['end_to_end_vs_model_only']:.2f}x; the input's share of "
                     f"the CPU: {100 * result['input_cpu_share']:.0f} %")
        taking = result["variants"]["end_to_end"]
        lines.append(f"the training thread taking a step's batches: {taking['input_thread_cpu_ms_per_step']:.1f} ms "
                     f"of CPU, {100 * taking['data_wait_share']:.0f} % of the step's time")
    if "model_only_vs_plain_loop" in result:
        lines.append(f"DeepSpeed's training step / plain loop: {result['model_only_vs_plain_loop']:.2f}x")
    if "startup_s" in result:
        lines.append(f"\nstart-up of rank 0 over {result['startup_images']} images: {result['startup_s']:.3f} s warm "
                     f"({result['startup_first_s']:.3f} s the first time); handed to the other ranks: "
                     f"{result['handover_bytes_per_image']:.0f} B/image")
        e = result["epoch"]
        lines.append(f"one epoch, {e['images']} images in {e['seconds']:.1f} s: {e['files_opened']} opens of "
                     f"{e['distinct_files_opened']} files of the data set, {e['bytes_read'] / 1e6:.1f} MB read")
    if "numerics" in result:
        lines.append("relative error vs float64 on the CPU: " + ", ".join(f"{k} {v:.2g}" for k, v in result["numerics"].items()))
    if "layers" in result:
        lines += layer_lines(result)
    return "\n".join(lines)


def layer_lines(result: dict[str, Any]) -> list[str]:
    """The per-layer table: one tower's steps, each timed on its own."""
    lines = [f"\nper step of one tower (the network runs two), forward and backward timed apart; the memory-bound "
             f"steps against this device's copy bandwidth, {result['copy_bandwidth_gbps']:.4g} GB/s:",
             "| layer | step | kernel | forward ms | backward ms | MB moved fwd / bwd | GB/s fwd / bwd "
             "| of copy bandwidth fwd / bwd |", "|---|---|---|---|---|---|---|---|"]
    for r in result["layers"]:
        moved = rates = share = ""
        if "bytes_forward" in r:
            moved = f"{r['bytes_forward'] / 1e6:.3g} / {r['bytes_backward'] / 1e6:.3g}"
            rates = f"{r['gbps_forward']:.4g} / {r['gbps_backward']:.4g}"
            share = f"{100 * r['of_copy_bandwidth_forward']:.1f} % / {100 * r['of_copy_bandwidth_backward']:.1f} %"
        lines.append(f"| {r['layer']} | {r['step']} | {r['kernel']} | {r['forward_ms']:.3f} | {r['backward_ms']:.3f} "
                     f"| {moved} | {rates} | {share} |")
    return lines


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.config, args.set)
    rounds = args.rounds if args.rounds is not None else (3 if args.what == "data" and args.baseline else 1)
    if rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {rounds}")
    if args.what == "model":
        from alexnet_dist.bench.model import bench_model

        result = bench_model(cfg, args.ranks, args.baseline, args.steps, args.warmup, rounds)
    elif args.what == "data":
        from alexnet_dist.bench.data import bench_data

        result = bench_data(cfg, args.baseline, args.steps, args.warmup, rounds, args.epoch)
    else:
        from alexnet_dist.bench.train import bench_train

        result = bench_train(cfg, args.ranks, args.steps, args.warmup, rounds)
    result["rounds"] = rounds
    result.update(device=device_name(), date=datetime.date.today().isoformat(),
                  command="python -m alexnet_dist.bench " + " ".join(sys.argv[1:]))
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    try:
        result = run(args)
    except (ConfigError, DataError) as e:
        say(f"error: {e}", sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    say(markdown_table(result))
    if args.plot:
        from alexnet_dist.viz import plot_bench

        plot_bench(result, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
