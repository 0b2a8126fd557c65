"""An independent BiT ResNet-V2, written for the tests from its description, as the reference the
checkpoint mapping of :mod:`mosx.models.bit` is checked against.

Sources: the BiT paper (Kolesnikov et al., "Big Transfer (BiT): General Visual Representation
Learning", ECCV 2020: pre-activation ResNet-v2, GroupNorm + weight standardisation in every conv,
widths scaled by a width factor) and the module layout that the keys of BiT-PyTorch / MOS
checkpoints reveal (``root.conv``, ``body.blockB.unitUU.{gn1,conv1,gn2,conv2,gn3,conv3,downsample}``,
``before_head.gn`` (MOS) or ``head.gn`` (BiT-PyTorch), ``head.conv``). Nothing here comes from timm,
so a mapping onto timm's ResNetV2 that reproduces these logits is checked against a second,
separately written model, not against itself.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
WS_EPS = 1e-10  # the weight standardisation epsilon of the BiT code


class WSConv2d(nn.Conv2d):
    """A conv whose weight is standardised per output channel before use: (w - mean) / sqrt(var +
    eps), biased variance over (in, kh, kw)."""

    def forward(self, x):
        w = self.weight
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, correction=0)
        w = (w - mean) / torch.sqrt(var + WS_EPS)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _ws(cin, cout, k, stride=1):
    return WSConv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


class Unit(nn.Module):
    """Pre-activation bottleneck: GN + ReLU before every conv; the stride sits on the 3x3 conv;
    the projection shortcut (first unit of a block) reads the pre-activated input."""

    def __init__(self, cin, cout, cmid, stride=1):
        super().__init__()
        self.gn1 = nn.GroupNorm(32, cin)
        self.conv1 = _ws(cin, cmid, 1)
        self.gn2 = nn.GroupNorm(32, cmid)
        self.conv2 = _ws(cmid, cmid, 3, stride)
        self.gn3 = nn.GroupNorm(32, cmid)
        self.conv3 = _ws(cmid, cout, 1)
        if stride != 1 or cin != cout:
            self.downsample = _ws(cin, cout, 1, stride)

    def forward(self, x):
        a = F.relu(self.gn1(x))
        shortcut = self.downsample(a) if hasattr(self, "downsample") else x
        y = self.conv1(a)
        y = self.conv2(F.relu(self.gn2(y)))
        y = self.conv3(F.relu(self.gn3(y)))
        return y + shortcut


class BiTResNetV2(nn.Module):
    """BiT ResNet-V2 with `units` bottleneck units per block and width factor `wf`.

    layout "mos": ``before_head`` (gn, relu, pool) then ``head`` (conv), as the MOS code names them;
    layout "bit": one ``head`` with gn, relu, pool and conv, as BiT-PyTorch names them.
    """

    def __init__(self, units=(3, 4, 23, 3), wf=1, head_size=1000, layout="mos", in_chans=3):
        super().__init__()
        self.root = nn.Sequential(
            OrderedDict(
                conv=_ws(in_chans, 64 * wf, 7, 2),
                pad=nn.ConstantPad2d(1, 0.0),
                pool=nn.MaxPool2d(3, stride=2, padding=0),
            )
        )
        blocks, cin = OrderedDict(), 64 * wf
        for b, n in enumerate(units):
            cout, cmid = 256 * wf * 2**b, 64 * wf * 2**b
            block = OrderedDict()
            for u in range(n):
                stride = 2 if (u == 0 and b > 0) else 1
                block[f"unit{u + 1:02d}"] = Unit(cin if u == 0 else cout, cout, cmid, stride)
            blocks[f"block{b + 1}"] = nn.Sequential(block)
            cin = cout
        self.body = nn.Sequential(blocks)
        pre = OrderedDict(gn=nn.GroupNorm(32, cin), relu=nn.ReLU(), avg=nn.AdaptiveAvgPool2d(1))
        conv = nn.Conv2d(cin, head_size, 1, bias=True)
        if layout == "mos":
            self.before_head = nn.Sequential(pre)
            self.head = nn.Sequential(OrderedDict(conv=conv))
        elif layout == "bit":
            self.head = nn.Sequential(OrderedDict(**pre, conv=conv))
        else:
            raise ValueError(layout)

    def forward(self, x):
        x = self.body(self.root(x))
        if hasattr(self, "before_head"):
            x = self.before_head(x)
        return self.head(x)[:, :, 0, 0]


@torch.no_grad()
def randomise(model: nn.Module, gen: torch.Generator, conv_std: float | None = None) -> nn.Module:
    """Random weights everywhere, GroupNorm affine included. conv_std None: He-like per layer
    (what trained nets look like); a number: that std for every WS conv (small values make the
    standardisation epsilon matter)."""
    for m in model.modules():
        if isinstance(m, WSConv2d):
            fan_in = m.weight[0].numel()
            std = conv_std if conv_std is not None else (2.0 / fan_in) ** 0.5
            m.weight.copy_(
                torch.randn(m.weight.shape, generator=gen) * std
                + 0.1 * std * torch.randn((m.weight.shape[0], 1, 1, 1), generator=gen)
            )
        elif isinstance(m, nn.GroupNorm):
            m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
        elif isinstance(m, nn.Conv2d):  # the head
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (1.0 / m.weight[0].numel()) ** 0.5)
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    return model
