"""Kernel-sized convolutions as matrix products: same values, same gradients, same parameters."""

import copy

import pytest
import torch
from torch import nn

from training import registry
from training.full_kernel_conv import FullKernelConv2d, use_full_kernel_convs


def _pair(cin=6, cout=5, kernel=3, **kwargs):
    torch.manual_seed(0)
    plain = nn.Conv2d(cin, cout, kernel, **kwargs)
    fast = copy.deepcopy(plain)
    assert use_full_kernel_convs(fast) == 1
    return plain, fast


def test_kernel_sized_input_matches_the_convolution_in_value_and_gradients():
    plain, fast = _pair(stride=2)
    x = torch.randn(4, 6, 3, 3, requires_grad=True)
    x_fast = x.detach().clone().requires_grad_(True)
    out, out_fast = plain(x), fast(x_fast)
    assert out_fast.shape == out.shape == (4, 5, 1, 1)
    torch.testing.assert_close(out_fast, out, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    out_fast.square().sum().backward()
    torch.testing.assert_close(x_fast.grad, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.bias.grad, plain.bias.grad, rtol=1e-5, atol=1e-5)


def test_channels_last_input_is_flattened_in_channel_order():
    plain, fast = _pair()
    x = torch.randn(2, 6, 3, 3).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)


def test_larger_inputs_take_the_ordinary_convolution():
    plain, fast = _pair()
    x = torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [{"padding": 1}, {"dilation": 2}, {"groups": 2}, {"padding": "same"}])
def test_padded_dilated_or_grouped_convolutions_are_left_alone(kwargs):
    conv = nn.Conv2d(6, 4, 3, **kwargs)
    assert use_full_kernel_convs(conv) == 0 and type(conv) is nn.Conv2d


@pytest.mark.slow  # builds VGG-16 (134 M parameters)
def test_vgg_classifier_is_swapped_and_keeps_its_state_dict():
    spec = registry.get("vgg16")
    torch.manual_seed(0)
    model = registry.build_model(spec, init="random", image_size=32).eval()
    assert isinstance(model.pre_logits.fc1, FullKernelConv2d)
    assert isinstance(model.pre_logits.fc2, FullKernelConv2d)
    assert type(model.features[0]) is nn.Conv2d  # padded trunk convolutions stay as they are
    plain = registry.build_model(spec, init="random", image_size=32).eval()
    for module in plain.modules():
        if type(module) is FullKernelConv2d:
            module.__class__ = nn.Conv2d
    plain.load_state_dict(model.state_dict())  # same keys and shapes
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=1e-4, atol=1e-4)
