"""Per-family optimisation recipes (the config's `recipes` section overrides them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from training.errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    """Optimiser and schedule for one model family (STUDY.md §3)."""

    optimizer: Literal["adam", "adamw", "sgd"]
    lr: float
    epochs: int
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"recipes.*.lr: {self.lr!r} is not valid; use a learning rate > 0")
        if self.epochs < 1:
            raise ConfigError(f"recipes.*.epochs: {self.epochs!r} is not valid; use an integer >= 1")


# STUDY.md §3 / the paper, §3.3: VGG and ResNet Adam 1e-4 for 50 epochs; ViT SGD 1e-4 for 300.
PAPER_RECIPES: dict[str, Recipe] = {
    "vgg": Recipe("adam", 1e-4, 50),
    "resnet": Recipe("adam", 1e-4, 50),
    "vit": Recipe("sgd", 1e-4, 300, momentum=0.9),
}
