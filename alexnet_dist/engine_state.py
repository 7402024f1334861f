"""This rank's towers' whole weights and SGD momentum, read out of the DeepSpeed engine and
put back into it, whatever holds them.

At ZeRO stage 0 the module holds the weights and torch's SGD the momentum, per parameter.
At ZeRO stage 1 the fp32 weights and their momentum live in flat partitions sharded over
the replicas; DeepSpeed's public fragment API (``deepspeed.utils.safe_get_full_*``)
assembles or scatters each parameter's whole tensor, collectively over the data-parallel
group. Either way the result is keyed by the single-process network's names
(``towers.tower0.features.0.weight``, ...; the module's ``to_towers``/``from_towers``
convert, gathering a hybrid group's classifier shares), so a checkpoint written by any
layout loads into any other: one process, any even number of ranks, towers or hybrid,
ZeRO 0 or 1. DeepSpeed is imported
where it is used, as everywhere here: importing it prints its accelerator line before the
job can keep it out of view.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MOMENTUM", "load_towers", "read_towers", "read_loss_scale", "load_loss_scale"]

MOMENTUM = "momentum_buffer"  # torch.optim.SGD's state key
_LOSS_SCALE_KEYS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")  # fp16's dynamic scaler


def _sharded(engine) -> bool:
    """Whether ZeRO holds the weights' fp32 copies and momentum (it links every parameter to its slice)."""
    return hasattr(next(engine.module.parameters()), "_hp_mapping")


def read_towers(engine, optimizer: torch.optim.Optimizer) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """``{tower: {"weights": {name: fp32}, "momentum": {name: fp32}}}`` for this rank's towers,
    on the CPU, in the single-process form (the module's ``to_towers``). Collective under ZeRO:
    every rank of each data-parallel group calls it; in the hybrid layout also over the group."""
    from deepspeed.utils import safe_get_full_fp32_param

    sharded = _sharded(engine)
    weights, momentum = {}, {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p) if sharded else None
        weights[name] = (full if full is not None else p.detach()).float().cpu()
        mom = _full_momentum(p, optimizer, sharded)
        if mom is not None:
            momentum[name] = mom.float().cpu()
    weights, momentum = engine.module.to_towers(weights), engine.module.to_towers(momentum)
    return {t: {"weights": weights[t], "momentum": momentum[t]} for t in weights}


def _full_momentum(p: nn.Parameter, optimizer: torch.optim.Optimizer, sharded: bool) -> torch.Tensor | None:
    from deepspeed.utils import safe_get_full_optimizer_state

    if not sharded:
        return optimizer.state.get(p, {}).get(MOMENTUM)
    try:
        return safe_get_full_optimizer_state(p, MOMENTUM)
    except ValueError:  # ZeRO makes the momentum at its first step: none yet
        return None


def load_towers(engine, states: dict[int, dict[str, dict[str, torch.Tensor]]]) -> None:
    """Put ``states`` (as :func:`read_towers` gives them) into this rank's towers: the module's
    weights, ZeRO's fp32 copies, the momentum. A parameter without momentum starts without
    (SGD's first step then takes the gradient itself, as from a zero buffer)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    sharded = _sharded(engine)
    if sharded:
        _make_zero_momentum(engine.optimizer)
    module = engine.module
    weights = module.from_towers({t: s["weights"] for t, s in states.items()})
    momentum = module.from_towers({t: s["momentum"] for t, s in states.items()})
    for name, p in module.named_parameters():
        value = weights[name].to(p.device)
        with torch.no_grad():
            p.copy_(value)  # the module's copy (fp16 under fp16)
        if sharded:
            safe_set_full_fp32_param(p, value)
        if name not in momentum:
            continue
        if sharded:
            safe_set_full_optimizer_state(p, momentum[name].to(p.device), MOMENTUM)
        else:
            engine.optimizer.state[p][MOMENTUM] = momentum[name].to(p.device).clone()


def _make_zero_momentum(zero_optimizer) -> None:
    """ZeRO 1 creates its partitions' momentum at their first step and links each parameter
    to its slice only then; a resume sets momentum before that. Zeros are what SGD's first
    step would start from (``buf = 0.9 * 0 + grad``)."""
    for flat in zero_optimizer.single_partition_of_fp32_groups:
        zero_optimizer.optimizer.state[flat].setdefault(MOMENTUM, torch.zeros_like(flat))
    zero_optimizer._lazy_init_hp_params_optimizer_state()  # links each parameter to its momentum slice


def read_loss_scale(engine) -> dict[str, float]:
    """fp16's dynamic loss scale and its counters (empty in fp32 and bf16)."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    return {k: getattr(scaler, k) for k in _LOSS_SCALE_KEYS if hasattr(scaler, k)}


def load_loss_scale(engine, state: dict[str, float]) -> None:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for key, value in state.items():
        if hasattr(scaler, key):
            setattr(scaler, key, value)
