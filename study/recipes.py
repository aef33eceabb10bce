"""Per-family optimisation recipes (the config's `recipes` section overrides them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from study.errors import require


@dataclass(frozen=True)
class Recipe:
    """Optimiser and schedule for one model family (docs/STUDY.md §3)."""

    optimizer: Literal["adam", "adamw", "sgd"]
    lr: float
    epochs: int
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0

    def __post_init__(self):
        # no upper bound on lr: a diverging one is caught at its first non-finite loss
        require(self.lr > 0, "recipes.*.lr", self.lr, "a learning rate > 0")
        require(1 <= self.epochs <= 100_000, "recipes.*.epochs", self.epochs, "an integer in [1, 100000]")
        require(0 <= self.momentum < 1, "recipes.*.momentum", self.momentum, "a value in [0, 1)")
        require(0 <= self.weight_decay < 1, "recipes.*.weight_decay", self.weight_decay, "a value in [0, 1)")


# docs/STUDY.md §3 / the paper, §3.3: VGG and ResNet Adam 1e-4 for 50 epochs; ViT SGD 1e-4 for 300.
PAPER_RECIPES: dict[str, Recipe] = {
    "vgg": Recipe("adam", 1e-4, 50),
    "resnet": Recipe("adam", 1e-4, 50),
    "vit": Recipe("sgd", 1e-4, 300, momentum=0.9),
}
