"""Building the study's models with timm from their specs (`study.models`, docs/STUDY.md §3).

The specs (timm name, pretrained tag, family, depth, target layer) live in `study.models`,
torch-free, and are re-exported here; every test about "all models" loops over `names()`.

Target layers, checked against timm 1.0.31 (tests/training/test_registry.py re-checks them):
- vgg16 `features.28`, vgg19 `features.34`: the last Conv2d of `features` (14x14 at 224 px).
  `features[-1]` is a MaxPool2d (7x7) and `features[-2]` the in-place ReLU after the conv; the
  pooled map then goes through timm's `pre_logits` ConvMlp (fc6/fc7 as a 7x7 and a 1x1 conv),
  so the last conv is the last layer with a spatial map of its own. Its output tensor is
  overwritten by that in-place ReLU: a hook that stores it must clone it.
- resnets `layer4.-1`: the final residual block (7x7 at 224 px).
- vits `blocks.-1.norm1`: tokens (B, prefix + gh*gw, D); drop the `num_prefix_tokens` (CLS)
  tokens and reshape to `patch_embed.grid_size`. `norm2` and the final `norm` give zero patch
  gradients with a CLS-token head.

Pretrained tags: `tv_in1k` (the original torchvision ImageNet-1k weights) for VGG and ResNet, the
weights most 2020-2023 medical fine-tuning papers start from; `augreg_in21k_ft_in1k` for the
ViTs (ImageNet-21k pretraining, then fine-tuned on ImageNet-1k; "How to train your ViT", which
the paper cites). ViT-L has no ImageNet-1k-only classification weights in timm, so the three
ViTs share this tag. The paper says only "pretrained on ImageNet-1K".
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import timm
import torch
from torch import nn

from study import models
from study.errors import ConfigError
from study.models import REGISTRY, ModelSpec, get, get_spec, names, recipe_for  # noqa: F401 (re-exported)
from training import weights
from training.full_kernel_conv import use_full_kernel_convs


def specs_for(models_config: Any) -> list[ModelSpec]:
    """`models.specs_for`, and every `models.extra` entry names an architecture timm has."""
    specs = models.specs_for(models_config)
    for key in models_config.extra:
        if not timm.is_model(models_config.extra[key].timm_name):
            raise ConfigError(f"models.extra.{key}.timm_name: {models_config.extra[key].timm_name!r} is not a "
                              f"timm architecture (see timm.list_models())")
    return specs


def build_model(spec: ModelSpec, *, init: str, image_size: int, weights_file: Optional[str] = None,
                num_classes: int = 2, in_chans: int = 3) -> nn.Module:
    """A timm model with a fresh `num_classes`-way head.

    init "imagenet": the backbone from `weights_file` when given, else timm's pretrained weights
    for `spec.pretrained_name` (Hugging Face cache); a WeightsError says how to provide them.
    init "random": timm's random initialisation, the only way to get one. The model carries
    `model.camstudy_weights`, a `weights.WeightsReport` saying where its weights came from.
    """
    kwargs = create_kwargs(spec, image_size=image_size, num_classes=num_classes, in_chans=in_chans)
    if init == "random":
        if weights_file is not None:
            raise ConfigError(f"models.weights_files.{spec.name}: a weights file was given but models.init is "
                              f"'random'; set models.init to 'imagenet' or remove the file entry")
        model, report = timm.create_model(spec.timm_name, pretrained=False, **kwargs), weights.RANDOM
    elif init == "imagenet" and weights_file is not None:
        model, report = weights.from_file(spec.timm_name, weights_file, model_key=spec.name, **kwargs)
    elif init == "imagenet":
        model, report = weights.from_pretrained(spec.pretrained_name, model_key=spec.name, **kwargs)
    else:
        raise ConfigError(f"models.init: {init!r} is not valid; use 'imagenet' or 'random'")
    use_full_kernel_convs(model)  # VGG's convolutional classifier as matrix products on the CPU
    model.camstudy_weights = report
    return model


def create_kwargs(spec: ModelSpec, *, image_size: int, num_classes: int = 2, in_chans: int = 3) -> dict:
    """timm `create_model` keywords; models with a fixed input size (ViTs) get `img_size`, which
    sizes their position embeddings (pretrained ones are resampled by timm's checkpoint filter)."""
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
    if timm.get_pretrained_cfg(spec.timm_name, allow_unregistered=True).fixed_input_size:
        kwargs["img_size"] = image_size
    return kwargs


def resolve_layer(model: nn.Module, dotted: str) -> nn.Module:
    """The submodule at a dotted path such as "layer4.-1" or "blocks.-1.norm1"."""
    module = model
    for depth, part in enumerate(dotted.split(".")):
        module = _child(module, part)
        if module is None:
            parent = ".".join(dotted.split(".")[:depth]) or "the model"
            raise ConfigError(f"target layer {dotted!r} not found in {_describe(model)}: {parent} has no "
                              f"child {part!r}")
    return module


def _child(module: nn.Module, part: str) -> Optional[nn.Module]:
    if part in module._modules:
        return module._modules[part]
    if part.lstrip("-").isdigit() and isinstance(module, (nn.Sequential, nn.ModuleList)):
        index = int(part)
        return module[index] if -len(module) <= index < len(module) else None
    return None


def _describe(model: nn.Module) -> str:
    architecture = getattr(model, "pretrained_cfg", {}).get("architecture")
    return f"{architecture} ({type(model).__name__})" if architecture else type(model).__name__


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@functools.lru_cache(maxsize=None)  # asked for every run by the train and explain stages
def parameter_count_millions(spec: ModelSpec, image_size: int = 224, num_classes: int = 2, in_chans: int = 3) -> float:
    """Parameters of the 2-way model, in millions, counted on the meta device (no memory; 0.1-0.5 s
    the first time per spec, then cached)."""
    return parameter_count(_meta_model(spec, image_size, in_chans, num_classes)) / 1e6


def largest_first(plans: list) -> list:
    """Plans (anything with a `.spec`) with the most parameters first: scheduled in this order
    (longest processing time first), the last to start is a short one, so workers stay busy to
    the end instead of waiting on one long straggler."""
    return sorted(plans, key=lambda plan: -parameter_count_millions(plan.spec))


@functools.lru_cache(maxsize=None)  # asked once per run and layer list by the explain stage
def layer_geometry(spec: ModelSpec, layers: tuple[str, ...], image_size: int,
                   in_chans: int = 3) -> dict[str, tuple[float, int]]:
    """layer -> (depth, map size) for `image_size` inputs, from one forward on the meta device (no
    memory, no weights). depth is the share of the network's weight layers (Conv2d and Linear, in
    the order they run, the head included) that have run when the layer's output exists: 0 at the
    input, 1 after the head. The map size is the side of the layer's (h, w) map, or of the patch
    grid for token layers."""
    model = _meta_model(spec, image_size, in_chans)
    ran: list[nn.Module] = []
    seen: dict[str, tuple[int, int]] = {}

    def record(layer: str, output: torch.Tensor) -> None:  # a hook that returns a value replaces the output
        seen.setdefault(layer, (len(ran), _side(model, spec, output)))

    weight_layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(lambda m, i, o: ran.append(m) and None) for m in weight_layers]
    for layer in layers:
        handles.append(resolve_layer(model, layer).register_forward_hook(
            lambda m, i, o, layer=layer: record(layer, o)))
    _hooked_forward(model, handles, image_size, in_chans)
    return {layer: (seen[layer][0] / len(ran), seen[layer][1]) for layer in layers}


def _meta_model(spec: ModelSpec, image_size: int, in_chans: int, num_classes: int = 2) -> nn.Module:
    """The 2-way model on the meta device (no memory, no weights): for counting, not computing."""
    with torch.device("meta"):
        return timm.create_model(spec.timm_name, pretrained=False, **create_kwargs(
            spec, image_size=image_size, num_classes=num_classes, in_chans=in_chans)).eval()


def _hooked_forward(model: nn.Module, handles: list, image_size: int, in_chans: int,
                    context: Optional[Any] = None) -> None:
    """One forward of a meta model on one image (inside `context`, if given); the hooks removed after."""
    import contextlib

    try:
        with context or contextlib.nullcontext(), torch.no_grad():
            model(torch.zeros(1, in_chans, image_size, image_size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()


def _side(model: nn.Module, spec: ModelSpec, output: torch.Tensor) -> int:
    return int(model.patch_embed.grid_size[0]) if spec.token_reshape else int(output.shape[-2])


@functools.lru_cache(maxsize=None)  # asked once per run by the explain stage
def cascade_units(spec: ModelSpec, image_size: int, in_chans: int = 3) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The units of the cascading randomisation (docs/STUDY.md §10), head first: ("head", the modules
    that run after the last stage layer), then one unit per stage layer, deepest first (the
    modules that run after the previous stage layer's output, up to and including this one's),
    the shallowest unit holding the stem too. Each unit lists the names of the modules that own
    parameters or buffers; together they hold every such module once (one never run counts as
    head), so randomising every unit randomises the whole network. Found by one forward on the
    meta device, in the order the modules run."""
    model = _meta_model(spec, image_size, in_chans)
    owners = [name for name, m in model.named_modules() if m._parameters or m._buffers]
    started: list[str] = []
    boundary: dict[str, int] = {}

    def start(name: str) -> None:  # a hook that returns a value replaces the input
        if name not in started:
            started.append(name)

    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_pre_hook(lambda m, i, name=name: start(name)) for name in owners]
    for layer in spec.stage_layers:
        handles.append(resolve_layer(model, layer).register_forward_hook(
            lambda m, i, o, layer=layer: boundary.setdefault(layer, len(started)) and None))
    _hooked_forward(model, handles, image_size, in_chans)
    cuts = [boundary[layer] for layer in spec.stage_layers]
    never_run = tuple(name for name in owners if name not in started)
    units = [("head", tuple(started[cuts[-1]:]) + never_run)]
    for k in range(len(cuts) - 1, -1, -1):
        units.append((spec.stage_layers[k], tuple(started[cuts[k - 1] if k else 0:cuts[k]])))
    return tuple(units)


@functools.lru_cache(maxsize=None)  # asked once per run by the train stage's scheduler
def forward_cost(spec: ModelSpec, image_size: int, in_chans: int = 3) -> tuple[float, float]:
    """(FLOPs, activation elements) of one image's forward pass, counted on the meta device
    (`torch.utils.flop_counter`; activations: the outputs of every leaf module)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _meta_model(spec, image_size, in_chans)
    elements = [0]

    def count(module: nn.Module, inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            elements[0] += output.numel()

    handles = [m.register_forward_hook(count) for m in model.modules() if not any(True for _ in m.children())]
    counter = FlopCounterMode(display=False)
    _hooked_forward(model, handles, image_size, in_chans, counter)
    return float(counter.get_total_flops()), float(elements[0])
