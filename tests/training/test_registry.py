"""The model registry: every model builds, trains a step, and exposes its Grad-CAM target layer."""

import pytest
import timm
import torch
from torch import nn

from study.config import ExtraModel, ModelsConfig, StudyConfig
from training import registry
from study.errors import ConfigError
from study.recipes import PAPER_RECIPES
from tests.conftest import by_size

SIZE = 32  # smallest input every model accepts: 1x1 ResNet map, 2x2 VGG map, 2x2 ViT grid
ALL_MODELS = by_size(registry.names())


def _target_output(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = registry.resolve_layer(model, layer).register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, seen[0]


def _expected_grid(spec: registry.ModelSpec, size: int) -> tuple[int, int]:
    stride = {"vgg": 16, "resnet": 32, "vit": 16}[spec.family]  # VGG: 4 pools before the last conv
    return size // stride, size // stride


@pytest.mark.parametrize("name", ALL_MODELS)
def test_model_builds_trains_and_exposes_its_target_layer(name):
    spec = registry.get(name)
    torch.manual_seed(0)
    model = registry.build_model(spec, init="random", image_size=SIZE)
    assert model.camstudy_weights.source == "random"
    x = torch.randn(2, 3, SIZE, SIZE)
    logits, activation = _target_output(model, spec.target_layer, x)
    assert logits.shape == (2, 2)
    logits[:, 1].sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    grid = _expected_grid(spec, SIZE)
    if spec.token_reshape:
        assert tuple(model.patch_embed.grid_size) == grid
        assert activation.shape[:2] == (2, model.num_prefix_tokens + grid[0] * grid[1])
    else:
        assert activation.dim() == 4 and tuple(activation.shape[-2:]) == grid
    assert registry.parameter_count(model) > 1_000_000


@pytest.mark.slow
def test_vgg_target_is_the_last_conv_with_a_14x14_map_at_224():
    for name in ("vgg16", "vgg19"):
        model = registry.build_model(registry.get(name), init="random", image_size=224).eval()
        layer = registry.resolve_layer(model, registry.get(name).target_layer)
        assert layer is [m for m in model.features if isinstance(m, nn.Conv2d)][-1]
        assert isinstance(model.features[-1], nn.MaxPool2d)  # the trap: features[-1] is the final pool
    shapes = {}  # on vgg19, the last model built
    conv, pool = registry.resolve_layer(model, "features.34"), registry.resolve_layer(model, "features.-1")
    conv.register_forward_hook(lambda _m, _i, out: shapes.update(conv=out.shape[-2:]))
    pool.register_forward_hook(lambda _m, _i, out: shapes.update(pool=out.shape[-2:]))
    with torch.no_grad():
        model.features(torch.zeros(1, 3, 224, 224))
    assert shapes == {"conv": (14, 14), "pool": (7, 7)}


def test_vit_position_embeddings_follow_the_image_size():
    model = registry.build_model(registry.get("vit_small"), init="random", image_size=64)
    assert tuple(model.patch_embed.grid_size) == (4, 4)
    assert model.pos_embed.shape[1] == model.num_prefix_tokens + 16


def test_registry_lists_the_nine_paper_models_with_recipes():
    assert registry.names() == ["vgg16", "vgg19", "resnet18", "resnet34", "resnet50", "resnet101",
                                "vit_small", "vit_base", "vit_large"]
    for name in registry.names():
        spec = registry.get(name)
        assert timm.is_model(spec.timm_name)
        assert timm.get_pretrained_cfg(spec.pretrained_name) is not None, spec.pretrained_name
        assert registry.recipe_for(spec, PAPER_RECIPES) is PAPER_RECIPES[spec.family]


def test_each_spec_states_its_parameter_count():
    """The depth trend's x (docs/STUDY.md §11) is read from the spec without torch; it is the count
    of the 2-way model at 224 px that the registry measures, to the stated 0.01 M."""
    for name in registry.names():
        spec = registry.get(name)
        assert spec.parameters_millions == pytest.approx(registry.parameter_count_millions(spec), abs=0.005), name


def test_an_extra_model_is_one_config_entry():
    extra = ExtraModel(timm_name="resnet10t", family="resnet", depth=10, target_layer="layer4.-1")
    models = ModelsConfig(names=("resnet18", "tiny"), extra={"tiny": extra, "other": extra})
    specs = registry.specs_for(models)
    assert [s.name for s in specs] == ["resnet18", "tiny", "other"]
    model = registry.build_model(specs[1], init="random", image_size=SIZE)
    _, activation = _target_output(model, specs[1].target_layer, torch.randn(2, 3, SIZE, SIZE))
    assert activation.shape[-2:] == (1, 1)
    assert StudyConfig(models=models).models.extra["tiny"].family == "resnet"


def test_unknown_names_and_layers_are_config_errors():
    with pytest.raises(ConfigError, match="known models: vgg16, vgg19"):
        registry.specs_for(ModelsConfig(names=("resnet18", "resnet152")))
    with pytest.raises(ConfigError, match="built-in"):
        registry.specs_for(ModelsConfig(extra={"resnet18": ExtraModel("resnet18", "resnet", 18, "layer4.-1")}))
    with pytest.raises(ConfigError, match="not a timm architecture"):
        registry.specs_for(ModelsConfig(extra={"x": ExtraModel("no_such_net", "resnet", 1, "layer4")}))
    model = registry.build_model(registry.get("resnet18"), init="random", image_size=SIZE)
    with pytest.raises(ConfigError, match=r"'layer5\.-1' not found in resnet18 .*has no child 'layer5'"):
        registry.resolve_layer(model, "layer5.-1")
    with pytest.raises(ConfigError, match="layer4 has no child '-3'"):
        registry.resolve_layer(model, "layer4.-3")
    assert registry.resolve_layer(model, "layer4.-1") is model.layer4[1]
    with pytest.raises(ConfigError, match="models.init"):
        registry.build_model(registry.get("resnet18"), init="scratch", image_size=SIZE)
    with pytest.raises(ConfigError, match="recipe"):
        registry.recipe_for(registry.get("vit_small"), {"resnet": PAPER_RECIPES["resnet"]})
