"""The models of the study and their recipes: facts only, no torch (STUDY.md §3).

A spec names the timm architecture, the pretrained tag its ImageNet weights come from, its
recipe family, its depth and the Grad-CAM target layer as a dotted path into the timm model
(negative integers index sequences from the end). A tenth model is one config entry
(`models.extra`), not a code change. `training.registry` builds the timm models from these
specs (and says why each target layer and tag was chosen); the analysis reads family and depth
from here without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from training.errors import ConfigError
from training.recipes import Recipe

FAMILY_ORDER = ("vgg", "resnet", "vit")  # the paper's order of families in tables and figures


@dataclass(frozen=True)
class ModelSpec:
    """One architecture of the study."""

    name: str  # the study's key, e.g. "resnet50"
    timm_name: str  # timm architecture, e.g. "resnet50"
    pretrained_tag: Optional[str]  # timm weight tag, e.g. "tv_in1k"; None = timm's default tag
    family: str  # key of the config's `recipes`
    depth: int  # weight layers (CNNs) or transformer blocks (ViTs), as the paper counts them
    target_layer: str  # dotted path for Grad-CAM, e.g. "layer4.-1"
    token_reshape: bool = False  # the target layer outputs tokens, not a (B, C, h, w) map

    @property
    def pretrained_name(self) -> str:
        """`timm_name.tag`, the name timm's pretrained mechanism resolves."""
        return f"{self.timm_name}.{self.pretrained_tag}" if self.pretrained_tag else self.timm_name


_VIT_TAG = "augreg_in21k_ft_in1k"
_BUILTIN: tuple[ModelSpec, ...] = (
    ModelSpec("vgg16", "vgg16", "tv_in1k", "vgg", 16, "features.28"),
    ModelSpec("vgg19", "vgg19", "tv_in1k", "vgg", 19, "features.34"),
    ModelSpec("resnet18", "resnet18", "tv_in1k", "resnet", 18, "layer4.-1"),
    ModelSpec("resnet34", "resnet34", "tv_in1k", "resnet", 34, "layer4.-1"),
    ModelSpec("resnet50", "resnet50", "tv_in1k", "resnet", 50, "layer4.-1"),
    ModelSpec("resnet101", "resnet101", "tv_in1k", "resnet", 101, "layer4.-1"),
    ModelSpec("vit_small", "vit_small_patch16_224", _VIT_TAG, "vit", 12, "blocks.-1.norm1", True),
    ModelSpec("vit_base", "vit_base_patch16_224", _VIT_TAG, "vit", 12, "blocks.-1.norm1", True),
    ModelSpec("vit_large", "vit_large_patch16_224", _VIT_TAG, "vit", 24, "blocks.-1.norm1", True),
)
REGISTRY: Mapping[str, ModelSpec] = {spec.name: spec for spec in _BUILTIN}


def names() -> list[str]:
    """The built-in model keys, in the paper's order."""
    return list(REGISTRY)


def get(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def specs_for(models_config: Any) -> list[ModelSpec]:
    """The specs a `ModelsConfig` asks for: its `names`, then any `extra` entries not named there."""
    extras = {key: _extra_spec(key, extra) for key, extra in models_config.extra.items()}
    for key in extras:
        if key in REGISTRY:
            raise ConfigError(f"models.extra.{key}: {key!r} is a built-in model; give the extra model another key")
    known = {**REGISTRY, **extras}
    unknown = [name for name in models_config.names if name not in known]
    if unknown:
        raise ConfigError(f"models.names: unknown model(s) {unknown}; known models: {', '.join(known)} "
                          f"(declare a new one under models.extra)")
    chosen = list(models_config.names) + [key for key in extras if key not in models_config.names]
    return [known[name] for name in chosen]


def get_spec(models_config: Any, name: str) -> ModelSpec:
    """A model of this config by key: a `models.extra` entry or a built-in."""
    if name in models_config.extra:
        return next(spec for spec in specs_for(models_config) if spec.name == name)
    return get(name)


def _extra_spec(key: str, extra: Any) -> ModelSpec:
    return ModelSpec(key, extra.timm_name, extra.pretrained_tag, extra.family, extra.depth,
                     extra.target_layer, extra.token_reshape)


def recipe_for(spec: ModelSpec, recipes: Mapping[str, Recipe]) -> Recipe:
    if spec.family not in recipes:
        raise ConfigError(f"recipes: no recipe for family {spec.family!r} (model {spec.name}); "
                          f"families present: {sorted(recipes)}")
    return recipes[spec.family]
