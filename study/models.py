"""The models of the study and their recipes: facts only, no torch (docs/STUDY.md §3).

A spec names the timm architecture, the pretrained tag its ImageNet weights come from, its
recipe family, its depth and its Grad-CAM layers as dotted paths into the timm model (negative
integers index sequences from the end): the paper's target layer (`target_layer`, the "final"
arm of `cam.layers`), the output of every stage (`stage_layers`, docs/STUDY.md §9) and the layer whose
map is 1/16 of the input like VGG's and ViT's (`matched_layer`, the resolution-matched arm).
A tenth model is one config entry (`models.extra`), not a code change. `training.registry` builds the timm models from these
specs (and says why each target layer and tag was chosen); the analysis reads family and depth
from here without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from study.errors import ConfigError
from study.recipes import Recipe

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
    stage_layers: tuple[str, ...] = ()  # every stage's output, shallow to deep (the last is target_layer)
    matched_layer: Optional[str] = None  # map 1/16 of the input (14x14 at 224 px)
    # parameters of the 2-way model at 224 px, 3 channels, in millions (training.registry.parameter_count_millions,
    # which tests/training checks this against): the x of the depth trend (docs/STUDY.md §11); None: unknown
    parameters_millions: Optional[float] = None

    @property
    def pretrained_name(self) -> str:
        """`timm_name.tag`, the name timm's pretrained mechanism resolves."""
        return f"{self.timm_name}.{self.pretrained_tag}" if self.pretrained_tag else self.timm_name


# Which fields decide what a training run computes (its fingerprint, `training.loop.run_inputs`):
# the layer lists only choose where maps are read, so adding them left finished runs valid.
TRAINING_FIELDS = ("name", "timm_name", "pretrained_tag", "family", "depth", "target_layer", "token_reshape")

_VIT_TAG = "augreg_in21k_ft_in1k"
# Stage layers (docs/STUDY.md §9): VGG the last conv of each of its 5 blocks (before each max-pool);
# ResNet the last block of layer1..layer4; ViT norm1 of the blocks at depth 1/4, 1/2, 3/4 and the last.
_VGG16_STAGES = ("features.2", "features.7", "features.14", "features.21", "features.28")
_VGG19_STAGES = ("features.2", "features.7", "features.16", "features.25", "features.34")
_RESNET_STAGES = ("layer1.-1", "layer2.-1", "layer3.-1", "layer4.-1")


def _vit_stages(blocks: int) -> tuple[str, ...]:
    return tuple(f"blocks.{blocks * quarter // 4 - 1}.norm1" for quarter in (1, 2, 3)) + ("blocks.-1.norm1",)


def _resnet(name: str, depth: int, parameters: float) -> "ModelSpec":
    return ModelSpec(name, name, "tv_in1k", "resnet", depth, "layer4.-1", False, _RESNET_STAGES, "layer3.-1",
                     parameters)


def _vit(name: str, timm_name: str, blocks: int, parameters: float) -> "ModelSpec":
    return ModelSpec(name, timm_name, _VIT_TAG, "vit", blocks, "blocks.-1.norm1", True, _vit_stages(blocks),
                     "blocks.-1.norm1", parameters)


_BUILTIN: tuple[ModelSpec, ...] = (
    ModelSpec("vgg16", "vgg16", "tv_in1k", "vgg", 16, "features.28", False, _VGG16_STAGES, "features.28", 134.27),
    ModelSpec("vgg19", "vgg19", "tv_in1k", "vgg", 19, "features.34", False, _VGG19_STAGES, "features.34", 139.58),
    _resnet("resnet18", 18, 11.18), _resnet("resnet34", 34, 21.29), _resnet("resnet50", 50, 23.51),
    _resnet("resnet101", 101, 42.50),
    _vit("vit_small", "vit_small_patch16_224", 12, 21.67),
    _vit("vit_base", "vit_base_patch16_224", 12, 85.80),
    _vit("vit_large", "vit_large_patch16_224", 24, 303.30),
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
                     extra.target_layer, extra.token_reshape, tuple(extra.stage_layers), extra.matched_layer)


# --------------------------------------------------------------------------- CAM layers (cam.layers)

LAYER_ARMS = ("final", "stages", "matched")  # the values of cam.layers


def cam_layers(spec: ModelSpec, arms: Sequence[str]) -> list[str]:
    """The dotted layer paths the `cam.layers` arms ask of `spec`, shallow to deep, each once;
    the final (paper's) layer is always among them."""
    wanted = {"final": [spec.target_layer], "stages": list(spec.stage_layers),
              "matched": [spec.matched_layer] if spec.matched_layer else []}
    for arm in arms:
        if arm not in wanted:
            raise ConfigError(f"cam.layers: unknown arm {arm!r}; use some of {', '.join(LAYER_ARMS)}")
        if not wanted[arm]:
            field_name = "stage_layers" if arm == "stages" else "matched_layer"
            raise ConfigError(f"cam.layers asks for {arm!r} but model {spec.name} declares no {field_name}; "
                              f"set models.extra.{spec.name}.{field_name} or drop {arm!r} from cam.layers")
    chosen = [layer for arm in arms for layer in wanted[arm]] + [spec.target_layer]
    order = list(spec.stage_layers)  # shallow to deep; layers outside the stages go by request order
    return sorted(dict.fromkeys(chosen), key=lambda layer: (order.index(layer) if layer in order else len(order)))


def layer_roles(spec: ModelSpec, layer: str) -> dict[str, bool]:
    """Which arms a layer of `spec` belongs to: the columns `final_layer` and `matched_layer` of a map row."""
    return {"final_layer": layer == spec.target_layer, "matched_layer": layer == spec.matched_layer}


def recipe_for(spec: ModelSpec, recipes: Mapping[str, Recipe]) -> Recipe:
    if spec.family not in recipes:
        raise ConfigError(f"recipes: no recipe for family {spec.family!r} (model {spec.name}); "
                          f"families present: {sorted(recipes)}")
    return recipes[spec.family]
