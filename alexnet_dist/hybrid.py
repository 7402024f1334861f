"""The two-tower AlexNet in Krizhevsky's 2014 hybrid layout ("One weird trick for
parallelizing convolutional neural networks", arXiv 1404.5997): ``model.parallel: hybrid``.

A group of K ranks holds one copy of the network. Every rank runs both towers'
convolutions (conv1..conv5, as the single-process :class:`~alexnet_dist.model.AlexNet`
does) on its own images; fc6, fc7 and fc8 are split K ways by neurons. Take the
single-process network's fc6 as its towers' rows stacked, [tower0.fc6; tower1.fc6]
(2F neurons); rank j of the group holds the j-th K-th of them, and the same for fc7 and
for fc8's classes. For K = 2 the shares are exactly the towers' halves.

Per step, n images per rank, F = fc units per tower, C = the classes:

| step | shape on one rank | exchange over the group (backward) |
| --- | --- | --- |
| conv1..conv5 of both towers, flattened, concatenated | n x 2*C5*36 | |
| into fc6: every rank's images | K x (n x 2*C5*36) -> K*n x 2*C5*36 | all-gather (reduce-scatter) |
| fc6 share, ReLU, dropout | K*n x 2F/K | |
| into fc7: every share's neurons | K x (K*n x 2F/K) -> K*n x 2F | all-gather (reduce-scatter) |
| fc7 share, ReLU, dropout; into fc8 likewise | K*n x 2F | all-gather (reduce-scatter) |
| fc8 share, logits | K x (K*n x C/K) -> K*n x C | all-gather (split) |

Every rank of a group then holds the same logits for the group's K*n images. The
convolutions' weights are wrapped in :func:`~alexnet_dist.exchanges.sum_gradient_over`:
each rank applied them to its own images, so their gradient is the group's sum, formed
inside autograd before DeepSpeed averages over the groups.

Parameter names: the convolutions keep the single-process names
(``towers.tower0.features.0.weight``); the shares are ``fc6.weight`` ... ``fc8.bias``.
:meth:`HybridAlexNet.to_towers` and :meth:`~HybridAlexNet.from_towers` convert to and from the
single-process towers' tensors (the checkpoint's form).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from alexnet_dist.exchanges import gather_logits, gather_rows, start_gather_from_towers, sum_gradient_over
from alexnet_dist.model import AlexNet, Tower, TowerDropout, apply_run, class_split, layer_runs
from alexnet_dist.topology import NUM_TOWERS, shares

__all__ = ["ConvTower", "HybridAlexNet"]

FC_LAYERS = ("fc6", "fc7", "fc8")


class ConvTower(nn.Module):
    """A tower's convolutions: its ``features`` (conv1..conv5 with their ReLUs, LRNs, pools)."""

    def __init__(self, tower: Tower) -> None:
        super().__init__()
        self.index = tower.index
        self.features = tower.features


class _GroupSummedConv:
    """A convolution step whose weights' gradient is summed over the group."""

    def __init__(self, conv: nn.Conv2d, group: dist.ProcessGroup | None) -> None:
        self.conv, self.group = conv, group

    def __call__(self, x: Tensor) -> Tensor:
        c = self.conv
        weight, bias = (sum_gradient_over(p, self.group) for p in (c.weight, c.bias))
        return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)


def _share(layers: list[nn.Linear], rows: slice) -> nn.Linear:
    """The rows ``rows`` of the towers' ``layers`` stacked in tower order, as one layer."""
    weight = torch.cat([m.weight.detach() for m in layers])[rows]
    bias = torch.cat([m.bias.detach() for m in layers])[rows]
    share = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        share.weight.copy_(weight)
        share.bias.copy_(bias)
    return share


class HybridAlexNet(nn.Module):
    """Rank ``part`` of a group of ``parts`` (the group's ranks, from ``group`` when given).

    In training mode the input is this rank's own N x 3 x H x W images and the output the
    group's K*N x ``num_classes`` logits (rank order). In eval mode the input is the group's
    batch, the same on every rank (the validation feed gives each rank its group's), and the
    output its logits: no image gather. Initialised as the single-process network with the
    same ``seed`` (the same Tower layers and init), then cut into shares; with one part it is
    that network.
    """

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.5, init: str = "paper",
                 group: dist.ProcessGroup | None = None, seed: int | None = None, part: int = 0, parts: int = 1) -> None:
        super().__init__()
        if group is not None:
            part, parts = dist.get_rank(group), dist.get_world_size(group)
        whole = AlexNet(num_classes, width_mult, dropout, init, seed=seed)
        towers = list(whole.towers.values())
        fc = {t.index: [m for m in t.classifier if isinstance(m, nn.Linear)] for t in towers}
        hidden = sum(layers[0].out_features for layers in fc.values())
        if hidden % parts:
            raise ValueError(f"model.hybrid_size={parts} does not divide the classifier's {hidden} neurons "
                             f"(model.width_mult={width_mult}); choose a hybrid_size that does")
        if num_classes < parts:
            raise ValueError(f"model.hybrid_size={parts} is more than the {num_classes} classes: each rank needs one")
        self.group, self.part, self.parts, self.num_classes = group, part, parts, num_classes
        self.hidden_shares = shares(hidden, parts)
        self.class_shares = shares(num_classes, parts)
        # where fc6, fc7, fc8 sit in a single-process tower: "classifier.2", ...
        self._tower_names = [f"classifier.{i}" for i, m in enumerate(towers[0].classifier) if isinstance(m, nn.Linear)]
        self.towers = nn.ModuleDict({f"tower{t.index}": ConvTower(t) for t in towers})
        rows = {name: self._rows(name) for name in FC_LAYERS}
        self.fc6, self.fc7, self.fc8 = (_share([fc[t][i] for t in fc], rows[name]) for i, name in enumerate(FC_LAYERS))
        self.drop6, self.drop7 = TowerDropout(dropout), TowerDropout(dropout)

    def _rows(self, layer: str) -> slice:
        """This rank's rows of ``layer`` stacked over the towers."""
        sizes = self.class_shares if layer == "fc8" else self.hidden_shares
        start = sum(sizes[:self.part])
        return slice(start, start + sizes[self.part])

    def _convolutions(self, x: Tensor) -> Tensor:
        """Both towers' conv1..conv5 on ``x``: N x 3 x H x W -> N x 2*C5*36."""
        runs = [layer_runs(t.features, f"tower{t.index}", lambda conv: _GroupSummedConv(conv, self.group))
                for t in self.towers.values()]
        # conv3 reads both towers' conv2 maps: 2 x (N x C2 x 13 x 13) -> N x 2*C2 x 13 x 13
        both = torch.cat([apply_run(front, x) for (front, _), _ in runs], 1)
        # fc6 reads both towers' conv5 maps: 2 x (N x C5 x 6 x 6) -> N x 2*C5*36
        return torch.cat([apply_run(back, both).flatten(1) for _, (back, _) in runs], 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self._convolutions(x)
        if self.training:  # K x (N x 2*C5*36) -> K*N x 2*C5*36: my neurons for every rank's images
            h = start_gather_from_towers([h], self.group, "fc6", dim=0).wait()
        h = self.drop6(F.relu(self.fc6(h)))
        # K x (M x 2F/K) -> M x 2F: every share's neurons, the next layer's input (M = K*N rows)
        h = start_gather_from_towers([h], self.group, "fc7", dim=1).wait()
        h = self.drop7(F.relu(self.fc7(h)))
        h = start_gather_from_towers([h], self.group, "fc8", dim=1).wait()
        # K x (M x C/K, padded) -> M x C
        return gather_logits([self.fc8(h)], self.group, self.class_shares)

    def reseed_dropout(self, seed: int, replica: int, step: int) -> None:
        """Masks determined by (seed, group, step, share, layer): the shares' neurons differ, so do their masks."""
        for layer, drop in enumerate((self.drop6, self.drop7)):
            # integers only: a tuple's hash is the same in every process (strings' are salted)
            drop.reseed(hash((seed, replica, self.part, step, layer)) & 0x7FFF_FFFF_FFFF_FFFF)

    # ---- the single-process towers' form (checkpoints)

    def _linear_names(self):
        """(my name, the towers' names) of every classifier tensor, in a fixed order."""
        for layer, tower_name in zip(FC_LAYERS, self._tower_names):
            for kind in ("weight", "bias"):
                yield layer, f"{layer}.{kind}", [f"towers.tower{t}.{tower_name}.{kind}" for t in range(NUM_TOWERS)]

    def from_towers(self, towers: dict[int, dict[str, Tensor]]) -> dict[str, Tensor]:
        """My tensors (by my parameter names) from the single-process towers' (weights or
        momentum; names missing there stay missing)."""
        mine = {k: v for state in towers.values() for k, v in state.items() if ".features." in k}
        for layer, name, tower_names in self._linear_names():
            if all(n in towers[t] for t, n in enumerate(tower_names)):
                mine[name] = torch.cat([towers[t][n] for t, n in enumerate(tower_names)])[self._rows(layer)]
        return mine

    def to_towers(self, mine: dict[str, Tensor]) -> dict[int, dict[str, Tensor]]:
        """The single-process towers' tensors from every rank's share: collective over the
        group (every rank of it calls this, with the same names present)."""
        towers = {t.index: {k: v for k, v in mine.items() if k.startswith(f"towers.tower{t.index}.")}
                  for t in self.towers.values()}
        for layer, name, tower_names in self._linear_names():
            if name not in mine:
                continue
            sizes = self.class_shares if layer == "fc8" else self.hidden_shares
            whole = gather_rows(mine[name], self.group, sizes)  # K x (share x in) -> rows x in
            split = class_split(self.num_classes)[0] if layer == "fc8" else sum(self.hidden_shares) // NUM_TOWERS
            for t, (tower_name, rows) in enumerate(zip(tower_names, whole.split([split, len(whole) - split]))):
                towers[t][tower_name] = rows.clone()
        return towers
