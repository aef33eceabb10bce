"""Training augmentation (docs/STUDY.md §2) as batched tensor ops on (B, C, H, W) float images.

Runs wherever the batch is (the GPU during training) with one `torch.Generator` for all draws,
so a seed reproduces an epoch exactly. Per image: horizontal flip with probability p, rotation
uniform in [-d, d] degrees, contrast factor uniform in [1-c, 1+c] and brightness shift uniform
in [-b, b] (about 0, the image mean, since images are z-scored), then additive Gaussian noise.
Each step is skipped when its parameter is 0, and everything when `enabled` is false.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from study.config import AugmentConfig


def augment(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """A new augmented batch; `images` is not modified. Draws happen on the generator's device."""
    if not config.enabled:
        return images
    out = images
    if config.hflip_probability > 0:
        out = hflip(out, config.hflip_probability, generator)
    if config.rotate_degrees > 0:
        out = rotate(out, _uniform(len(out), config.rotate_degrees, generator, out.device))
    if config.contrast > 0 or config.brightness > 0:
        out = brightness_contrast(out, config.brightness, config.contrast, generator)
    if config.noise_std > 0:
        out = add_noise(out, config.noise_std, generator)
    return out


def hflip(images: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    flip = _rand((len(images),), generator, images.device) < probability
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image about its centre by `degrees[i]` (positive = clockwise on screen, rows pointing down).

    Bilinear, with reflected borders so the corners keep image-like intensities instead of a
    constant fill. Assumes square images (the cache stores S x S).
    """
    radians = degrees.to(images.dtype) * (math.pi / 180)
    cos, sin = torch.cos(radians), torch.sin(radians)
    zero = torch.zeros_like(cos)
    # affine_grid maps output to input coordinates (x right, y down): the inverse rotation
    theta = torch.stack([torch.stack([cos, sin, zero], -1), torch.stack([-sin, cos, zero], -1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def brightness_contrast(images: torch.Tensor, brightness: float, contrast: float,
                        generator: torch.Generator) -> torch.Tensor:
    factor = 1 + _uniform(len(images), contrast, generator, images.device)
    shift = _uniform(len(images), brightness, generator, images.device)
    return images * factor.view(-1, 1, 1, 1).to(images.dtype) + shift.view(-1, 1, 1, 1).to(images.dtype)


def add_noise(images: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=generator, device=generator.device, dtype=images.dtype)
    return images + std * noise.to(images.device)


def _rand(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _uniform(n: int, half_width: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """n values uniform in [-half_width, half_width]."""
    return (2 * _rand((n,), generator, device) - 1) * half_width
