"""Convolutions whose kernel covers the whole input run as one matrix product on the CPU.

VGG's classifier is convolutional in timm (`pre_logits.fc1`: a 7x7 convolution on a 7x7 map,
`fc2`: 1x1 on 1x1): each is a fully connected layer in disguise. On the CPU, oneDNN runs
those shapes 6-10x slower than the equivalent `F.linear` (measured on 2 cores, batch 8:
fc1 forward + input gradient 873 ms as a convolution, 135 ms as a matrix product), which is
12% of VGG16's Grad-CAM time and a large share of its training step at the demo size. The
swap keeps the module's parameters, state_dict keys and results (up to float rounding); other
inputs (a larger map, padding) and other devices run the ordinary convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FullKernelConv2d(nn.Conv2d):
    """An nn.Conv2d that computes `F.linear` when its kernel exactly covers a CPU input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or tuple(x.shape[-2:]) != tuple(self.kernel_size):
            return super().forward(x)
        out = F.linear(x.flatten(1), self.weight.flatten(1), self.bias)  # (B, out_channels)
        return out[:, :, None, None]


def use_full_kernel_convs(model: nn.Module) -> int:
    """Swap every eligible nn.Conv2d of `model` in place; returns how many were swapped.

    Eligible: unpadded, undilated, ungrouped convolutions, for which a kernel-sized input gives
    one output position equal to a matrix product. Others (and other inputs) are unchanged.
    """
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Conv2d and _is_plain(module):
            module.__class__ = FullKernelConv2d
            swapped += 1
    return swapped


def _is_plain(conv: nn.Conv2d) -> bool:
    # stride does not matter: a kernel-sized input has one output position whatever the stride
    return (conv.groups == 1 and tuple(conv.dilation) == (1, 1) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and tuple(conv.padding) == (0, 0))
