"""The two-tower AlexNet of Krizhevsky, Sutskever & Hinton, "ImageNet Classification
with Deep Convolutional Neural Networks", NIPS 2012 (section 3 and figure 2).

Each tower is one :class:`Tower`: a ``features`` and a ``classifier`` ``nn.Sequential``
as in torchvision's ``alexnet.py``, with :class:`CrossTower` markers where the paper's
towers read each other (the inputs of conv3, fc6, fc7 and fc8). :class:`AlexNet` runs
the towers it holds in lockstep and performs each exchange through
:mod:`alexnet_dist.exchanges`: with both towers in one process (the single-device
reference) an exchange is a concatenation; with one tower per rank it is an
all-gather over the pair, whose backward is a reduce-scatter. Same code path, so the
distributed network is exactly the single-device one.

Where we differ from the paper:

* conv1 uses padding 2 so that 224x224 inputs give 55x55 maps (the paper's 224 vs 227
  inconsistency); an adaptive 6x6 average pool before fc6 (identity at 224, as in
  torchvision) lets tests use small images.
* Dropout draws its masks from a generator reseeded per step from (seed, replica,
  tower, step), so masks differ between towers and replicas yet a run is reproducible,
  and the single-process reference draws the same masks as replica 0 of a cluster.
* An optional ``kaiming`` initialisation beside the paper's N(0, 0.01).
* ``num_classes`` may be odd: tower 0 owns the larger half of fc8.
* The LRN is computed in float32 whatever the precision. On GPUs the ReLU, LRN and
  max-pool after conv1 and conv2 run as one Triton kernel each way
  (:mod:`alexnet_dist.fused`, through :class:`ReLULRNPool`); the layers stay separate
  modules of ``features``, so the names of the weights are torchvision-style as before.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.profiler import record_function

from alexnet_dist.exchanges import PendingExchange, gather_logits, start_gather_from_towers
from alexnet_dist.topology import NUM_TOWERS

__all__ = ["AlexNet", "CrossTower", "Layer", "apply_run", "class_split", "layer_runs", "LocalResponseNorm",
           "memory_format_for", "ReLULRNPool", "Tower", "TowerDropout", "tower_widths"]

# Per-tower widths at width_mult=1 (the paper's figure 2).
CONV_WIDTHS = (48, 128, 192, 192, 128)
FC_WIDTH = 2048
POOLED = 6  # spatial size before fc6
LAYER_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
JOIN_CHUNKS_AT = "fc6"  # exchange_chunks split the batch up to this exchange (AlexNet's docstring says why)


def _lrn(x: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    """The paper's LRN as a pure function of ``x`` (N x C x H x W)."""
    # In float32 at least whatever the model's precision: squares of ReLU outputs overflow
    # fp16, and bf16's 8-bit mantissa drops the small terms of a window sum. (float64 stays
    # float64: it is the reference the GPU's kernels are checked against.)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    channels, half = x.shape[1], size // 2
    squares = F.pad(xf.square(), (0, 0, 0, 0, half, half))  # N x C+2h x H x W, zeros beyond the edges
    window = squares[:, :channels]
    for i in range(1, size):  # window[:, c] = sum of squares of channels c-h .. c+h
        window = window + squares[:, i:i + channels]
    denom = k + alpha * window
    if beta == 0.75:  # the paper's: d^-0.75 = d^-0.5 * d^-0.25, two cheap roots instead of pow
        inv = denom.rsqrt()
        return (xf * inv * inv.sqrt()).to(x.dtype)
    return (xf / denom.pow(beta)).to(x.dtype)


@functools.cache
def _compiled_lrn():
    # Eagerly the LRN is a dozen passes over conv1's and conv2's outputs each way, most of
    # a bf16 step on a GPU (docs/BENCHMARKS.md). Compiled, each direction is one fused
    # kernel. (TORCHDYNAMO_DISABLE=1 runs it eagerly, as on CPUs.)
    return torch.compile(_lrn, dynamic=False)


class LocalResponseNorm(nn.Module):
    """The paper's LRN over channels (section 3.3).

    b_i = a_i / (k + alpha * sum_j a_j^2)^beta, j from max(0, i - size//2) to
    min(N-1, i + size//2). Unlike ``torch.nn.LocalResponseNorm``, alpha is not divided
    by ``size``. Compiled on GPUs, eager elsewhere: the same function. In a :class:`Tower`
    on a GPU, the fused :class:`ReLULRNPool` step computes it instead.
    """

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, x: Tensor) -> Tensor:
        lrn = _compiled_lrn() if x.is_cuda else _lrn
        return lrn(x, self.size, self.alpha, self.beta, self.k)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


@functools.cache
def _fused_kernels():
    """:mod:`alexnet_dist.fused` where Triton imports (it compiles the kernels for GPUs), else None."""
    if importlib.util.find_spec("triton") is None:
        return None
    from alexnet_dist import fused

    return fused


class ReLULRNPool:
    """A ReLU, an LRN and the 3x3 stride-2 max-pool after them as one step of a tower's
    forward. On CUDA tensors, where Triton imports, one fused kernel each way
    (:mod:`alexnet_dist.fused`): the three layers' outputs are never stored, nor are the
    three modules called (their hooks do not fire). Elsewhere the three layers themselves,
    the reference (:meth:`unfused`)."""

    def __init__(self, relu: nn.ReLU, lrn: LocalResponseNorm, pool: nn.MaxPool2d) -> None:
        self.layers = (relu, lrn, pool)

    @staticmethod
    def fits(layers: Sequence[nn.Module]) -> bool:
        """Whether ``layers`` are a ReLU, an LRN and a 3x3 stride-2 max-pool without padding
        (the kernel's case)."""
        if len(layers) != 3:
            return False
        relu, lrn, pool = layers
        return (isinstance(relu, nn.ReLU) and isinstance(lrn, LocalResponseNorm) and isinstance(pool, nn.MaxPool2d)
                and (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode) == (3, 2, 0, 1, False))

    @staticmethod
    def kernels(x: Tensor):
        """:mod:`alexnet_dist.fused` where it runs for ``x`` (a CUDA tensor, Triton importable), else None."""
        return _fused_kernels() if x.is_cuda else None

    def __call__(self, x: Tensor) -> Tensor:
        fused = self.kernels(x)
        if fused is None:
            return self.unfused(x)
        lrn = self.layers[1]
        return fused.relu_lrn_pool(x, lrn.size, lrn.alpha, lrn.beta, lrn.k)

    def unfused(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Layer(NamedTuple):
    """One of the paper's layers as a tower runs it: a convolution or fully-connected layer
    and what follows it up to the next (ReLU, LRN, pooling, dropout), each a step."""

    name: str  # e.g. "tower0.conv1": its range in torch.profiler's and (under emit_nvtx) Nsight's traces
    steps: list[Callable[[Tensor], Tensor]]

    def __call__(self, x: Tensor) -> Tensor:
        with record_function(self.name):
            for step in self.steps:
                x = step(x)
        return x


class TowerDropout(nn.Module):
    """Dropout whose masks come from its own generator (see :meth:`AlexNet.reseed_dropout`)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.seed = 0
        self._generator: torch.Generator | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self._generator is None or self._generator.device != x.device:
            self._generator = torch.Generator(device=x.device)
            self._generator.manual_seed(self.seed)
        keep = torch.rand(x.shape, generator=self._generator, device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)

    def reseed(self, seed: int) -> None:
        self.seed = seed
        if self._generator is not None:
            self._generator.manual_seed(seed)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class CrossTower(nn.Module):
    """Marks where a tower's next layer reads every tower's activations.

    :class:`AlexNet` performs the exchange; the marker itself only names it.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError(f"exchange {self.name!r} runs inside AlexNet, which holds the towers")

    def extra_repr(self) -> str:
        return self.name


def class_split(num_classes: int) -> tuple[int, ...]:
    """Classes owned by each tower's fc8: tower 0 takes the larger half.

    >>> class_split(1000), class_split(5)
    ((500, 500), (3, 2))
    """
    first = math.ceil(num_classes / NUM_TOWERS)
    return (first, num_classes - first)


def apply_run(layers: list[Layer], x: Tensor) -> Tensor:
    """One run of :func:`layer_runs` on ``x``, layer by layer."""
    for layer in layers:
        x = layer(x)
    return x


def memory_format_for(device: torch.device) -> torch.memory_format:
    """The layout for input batches: NHWC on GPUs (what their convolution kernels want),
    the default on CPUs. Parameters stay contiguous: cuDNN takes NHWC from the input
    alone, and DeepSpeed broadcasts each parameter viewed as bytes, which a
    channels-last weight (last stride not 1) refuses in bf16/fp16."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def tower_widths(width_mult: float = 1.0) -> tuple[tuple[int, ...], int]:
    """(conv1..conv5 kernels, fc6 and fc7 units) of one tower at ``width_mult``.

    >>> tower_widths()
    ((48, 128, 192, 192, 128), 2048)
    >>> tower_widths(0.125)
    ((6, 16, 24, 24, 16), 256)
    """
    def scaled(width: int) -> int:
        return max(1, round(width * width_mult))

    return tuple(scaled(c) for c in CONV_WIDTHS), scaled(FC_WIDTH)


def layer_runs(modules: Sequence[nn.Module], prefix: str,
               weighted: Callable[[nn.Module], Callable[[Tensor], Tensor]] = lambda m: m,
               ) -> list[tuple[list[Layer], str | None]]:
    """``modules`` (a tower's, in order) as runs of :class:`Layer` between :class:`CrossTower`
    markers, each run with the exchange that follows it (None after the last). ``weighted``
    gives the step that applies a convolution or linear layer (the layer itself by default)."""
    runs: list[tuple[list[Layer], str | None]] = []
    current: list[Layer] = []
    names = iter(LAYER_NAMES)
    for module in modules:
        if isinstance(module, CrossTower):
            runs.append((current, module.name))
            current = []
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            current.append(Layer(f"{prefix}.{next(names)}", [weighted(module)]))
        else:
            steps = current[-1].steps
            steps.append(module)
            if ReLULRNPool.fits(steps[-3:]):
                steps[-3:] = [ReLULRNPool(*steps[-3:])]
    return runs + [(current, None)]


class Tower(nn.Module):
    """One of the paper's two towers (half of every layer)."""

    def __init__(self, index: int, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.5) -> None:
        super().__init__()
        self.index = index
        (c1, c2, c3, c4, c5), fc = tower_widths(width_mult)
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, kernel_size=11, stride=4, padding=2),  # conv1
            nn.ReLU(inplace=True),
            LocalResponseNorm(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),  # conv2
            nn.ReLU(inplace=True),
            LocalResponseNorm(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            CrossTower("conv3"),
            nn.Conv2d(NUM_TOWERS * c2, c3, kernel_size=3, padding=1),  # conv3
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1),  # conv4
            nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, kernel_size=3, padding=1),  # conv5
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.AdaptiveAvgPool2d((POOLED, POOLED)),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            CrossTower("fc6"),
            nn.Linear(NUM_TOWERS * c5 * POOLED * POOLED, fc),  # fc6
            nn.ReLU(inplace=True),
            TowerDropout(dropout),
            CrossTower("fc7"),
            nn.Linear(NUM_TOWERS * fc, fc),  # fc7
            nn.ReLU(inplace=True),
            TowerDropout(dropout),
            CrossTower("fc8"),
            nn.Linear(NUM_TOWERS * fc, class_split(num_classes)[index]),  # fc8
        )

    def layers(self) -> list[nn.Module]:
        return [*self.features, *self.classifier]

    def segments(self) -> list[tuple[list[Layer], str | None]]:
        """The runs of the paper's layers between exchanges, each with the exchange that follows it."""
        return layer_runs(self.layers(), f"tower{self.index}")

    def init_weights(self, scheme: str = "paper", generator: torch.Generator | None = None) -> None:
        """``paper``: weights N(0, 0.01), biases 1 in conv2, conv4, conv5, fc6, fc7, else 0.
        ``kaiming``: He-normal weights for the ReLU layers, N(0, 0.01) for fc8, biases 0."""
        weighted = [m for m in self.layers() if isinstance(m, (nn.Conv2d, nn.Linear))]
        # Order: conv1..conv5, fc6, fc7, fc8.
        ones = {1, 3, 4, 5, 6}
        for i, m in enumerate(weighted):
            if scheme == "paper":
                nn.init.normal_(m.weight, 0.0, 0.01, generator=generator)
                nn.init.constant_(m.bias, 1.0 if i in ones else 0.0)
            elif scheme == "kaiming":
                if m is weighted[-1]:
                    nn.init.normal_(m.weight, 0.0, 0.01, generator=generator)
                else:
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=generator)
                nn.init.zeros_(m.bias)
            else:
                raise ValueError(f"unknown init scheme {scheme!r}: use 'paper' or 'kaiming'")


class AlexNet(nn.Module):
    """The whole two-tower network, or this rank's towers of it.

    Input N x 3 x H x W (224 in the paper), output N x ``num_classes`` logits on every
    rank. ``towers`` selects the towers held here; ``group`` is the tower-parallel
    process group holding the others (``None``: all towers are local). With ``seed``,
    tower t is initialised from (seed, t) alone, so every layout starts from the same
    weights; without it, from the global RNG.

    ``exchange_chunks`` > 1 splits the batch into chunks that flow through the
    convolutional layers one after another, so chunk k's exchange (conv3's input, most
    of the forward bytes, then fc6's) is in flight while chunk k+1 computes. The chunks
    join before the classifier: a matrix product reads its whole weight matrix once per
    chunk (fc6-fc8 hold nearly all of the weights), which costs more than the small fc7 and
    fc8 exchanges could hide. The result is the same network.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        dropout: float = 0.5,
        init: str = "paper",
        towers: Sequence[int] = tuple(range(NUM_TOWERS)),
        group: dist.ProcessGroup | None = None,
        seed: int | None = None,
        exchange_chunks: int = 1,
    ) -> None:
        super().__init__()
        if num_classes < NUM_TOWERS:
            raise ValueError(f"num_classes must be at least {NUM_TOWERS} (one per tower), got {num_classes}")
        if group is None and len(towers) != NUM_TOWERS:
            raise ValueError("a model holding only some towers needs the process group of the others")
        self.num_classes = num_classes
        self.group = group
        self.exchange_chunks = exchange_chunks
        self.towers = nn.ModuleDict({f"tower{t}": Tower(t, num_classes, width_mult, dropout) for t in towers})
        for tower in self.towers.values():
            generator = None if seed is None else torch.Generator().manual_seed(seed * NUM_TOWERS + tower.index)
            tower.init_weights(init, generator)

    def forward(self, x: Tensor) -> Tensor:
        towers = list(self.towers.values())
        # Each chunk's state: its towers' activations, or the exchange it waits for.
        chunks: list[list[Tensor] | PendingExchange] = [[c] * len(towers) for c in x.chunk(self.exchange_chunks)]
        for position in zip(*(t.segments() for t in towers)):
            exchange = position[0][1]
            for i, state in enumerate(chunks):
                hs = [state.wait()] * len(towers) if isinstance(state, PendingExchange) else state
                hs = [apply_run(layers, h) for (layers, _), h in zip(position, hs)]
                # conv3: towers x (N x C2 x 13 x 13) -> N x 2*C2 x 13 x 13
                # fc6:   towers x (N x C5*36)        -> N x 2*C5*36
                # fc7, fc8: towers x (N x F)         -> N x 2*F
                chunks[i] = start_gather_from_towers(hs, self.group, exchange) if exchange else hs
            if exchange == JOIN_CHUNKS_AT and len(chunks) > 1:
                # chunks x (n x 2*C5*36) -> N x 2*C5*36, the classifier's input for every tower
                chunks = [[torch.cat([state.wait() for state in chunks], 0)] * len(towers)]
        # towers x (N x classes_t) -> N x num_classes
        logits = [gather_logits(hs, self.group, class_split(self.num_classes)) for hs in chunks]
        return logits[0] if len(logits) == 1 else torch.cat(logits, 0)

    def reseed_dropout(self, seed: int, replica: int, step: int) -> None:
        """Give every dropout layer masks determined by (seed, replica, tower, step, layer)."""
        for tower in self.towers.values():
            drops = [m for m in tower.layers() if isinstance(m, TowerDropout)]
            for layer, drop in enumerate(drops):
                key = (seed, replica, tower.index, step, layer)
                drop.reseed(hash(key) & 0x7FFF_FFFF_FFFF_FFFF)

    def to_towers(self, named: dict[str, Tensor]) -> dict[int, dict[str, Tensor]]:
        """Tensors keyed by this module's parameter names (weights, momentum) grouped by the tower
        holding them: the checkpoint's form."""
        towers: dict[int, dict[str, Tensor]] = {}
        for tower in self.towers.values():
            prefix = f"towers.tower{tower.index}."
            towers[tower.index] = {k: v for k, v in named.items() if k.startswith(prefix)}
        return towers

    def from_towers(self, towers: dict[int, dict[str, Tensor]]) -> dict[str, Tensor]:
        """The inverse of :meth:`to_towers` for the towers held here."""
        return {k: v for tower in self.towers.values() for k, v in towers[tower.index].items()}

    @classmethod
    def load(cls, path: str) -> AlexNet:
        """The whole network from a file written by ``python -m alexnet_dist.export``, in
        eval mode, with ``classes`` (its class names) and ``preprocess`` (``resize``,
        ``crop``, ``mean`` and ``std`` on the 0..1 scale) as it was trained."""
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = cls(**blob["model"])
        model.load_state_dict(blob["state_dict"])
        model.classes = blob.get("classes") or [str(i) for i in range(model.num_classes)]
        model.preprocess = blob.get("preprocess")  # None in files exported before it was recorded
        return model.eval()
