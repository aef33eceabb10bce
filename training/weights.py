"""Starting weights: timm's pretrained mechanism (Hugging Face cache), or a local file.

Pretrained weights load through `timm.create_model(name.tag, pretrained=True)`, which reads the
Hugging Face cache (`HF_HOME`, default ~/.cache/huggingface) and downloads into it when it can;
`HF_HUB_OFFLINE=1` makes it cache-only. A local file (`models.weights_files.<model>`, a
.safetensors or .pth/.pt state dict, optionally wrapped as {"state_dict": ...} or {"model": ...})
supplies the backbone: timm's own checkpoint filter for the architecture is applied (torchvision
VGG names, ViT position-embedding resampling), the classifier is always re-initialised for the
new head, and what was dropped is reported. Missing weights are one WeightsError that says how to
provide them; nothing ever falls back to random weights.
"""

from __future__ import annotations

import inspect
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import timm
import torch
from huggingface_hub import constants, try_to_load_from_cache
from timm.models import adapt_input_conv
from torch import nn

from study.errors import WeightsError
from study.models import specs_for  # the specs alone: training.registry builds models with this module

HOW_TO_PROVIDE = (
    "provide them in one of three ways: run `camstudy fetch-weights CONFIG` on a machine with internet "
    "access and copy its Hugging Face cache (~/.cache/huggingface) here; point HF_HOME at a folder that "
    "holds such a cache; or set models.weights_files.{key} to a local .safetensors/.pth file. "
    "To train from random weights instead, set models.init: random (an explicit choice)"
)


@dataclass(frozen=True)
class WeightsReport:
    """Where a model's starting weights came from (logged with every run)."""

    source: str  # "random", "hf-hub:timm/resnet18.tv_in1k" or "file:/path"
    dropped: tuple[str, ...] = ()  # source tensors not loaded (the classifier of the source model)


RANDOM = WeightsReport("random")


def from_pretrained(pretrained_name: str, *, model_key: str, **create_kwargs: Any) -> tuple[nn.Module, WeightsReport]:
    """timm model `pretrained_name` ("arch.tag") with its pretrained backbone and a new head."""
    cfg = _pretrained_cfg(pretrained_name, model_key)
    try:
        model = timm.create_model(pretrained_name, pretrained=True, **create_kwargs)
    except OSError as error:  # huggingface_hub's LocalEntryNotFoundError, HTTP and network errors
        raise WeightsError(_missing_message(pretrained_name, cfg, model_key, error)) from None
    source = f"hf-hub:{cfg.hf_hub_id}" if cfg.hf_hub_id else f"url:{cfg.url}"
    new_head = create_kwargs.get("num_classes", cfg.num_classes) != cfg.num_classes
    return model, WeightsReport(source, _head_keys(model) if new_head else ())


def from_file(timm_name: str, path: str | Path, *, model_key: str, **create_kwargs: Any) -> tuple[nn.Module, WeightsReport]:
    """timm model `timm_name` with the backbone from a local state-dict file and a new head."""
    path = Path(path).expanduser()
    where = f"models.weights_files.{model_key}"
    if not path.is_file():
        raise WeightsError(f"{where}: {path} does not exist; give the path of a .safetensors or .pth state "
                           f"dict for {timm_name} (or remove the entry to use timm's pretrained weights)")
    model = timm.create_model(timm_name, pretrained=False, **create_kwargs)
    state = _read_state_dict(path, where)
    state = _timm_filter(model)(state, model)
    head = _head_prefixes(model)
    dropped = tuple(sorted(key for key in state if key.startswith(head)))
    state = {key: value for key, value in state.items() if not key.startswith(head)}
    _adapt_input_convs(model, state)
    _load_backbone(model, state, f"{where} ({path})")
    return model, WeightsReport(f"file:{path}", dropped)


def fetch_weights(config: Any) -> list[str]:
    """Download every pretrained weight set the config needs into the HF cache; their names.

    Models with a local weights file, and every model under models.init 'random', need nothing.
    """
    if config.models.init != "imagenet":
        return []
    fetched = []
    for spec in specs_for(config.models):
        if spec.name in config.models.weights_files:
            continue
        from_pretrained(spec.pretrained_name, model_key=spec.name)  # full 1000-class model: nothing dropped
        fetched.append(spec.pretrained_name)
    return fetched


def missing_weights(config: Any) -> list[str]:
    """What the config needs that is not on this machine (HF cache or weights file); no network.

    A driver can call this before launching runs: with HF_HUB_OFFLINE or without internet access,
    anything listed here will fail in every run that needs it.
    """
    if config.models.init != "imagenet":
        return []
    missing = []
    for spec in specs_for(config.models):
        file = config.models.weights_files.get(spec.name)
        if file is not None and not Path(file).expanduser().is_file():
            missing.append(f"{spec.name}: file {file}")
        elif file is None and not _in_hf_cache(spec.pretrained_name, spec.name):
            missing.append(f"{spec.name}: {spec.pretrained_name} (not in {constants.HF_HUB_CACHE})")
    return missing


def _in_hf_cache(pretrained_name: str, model_key: str) -> bool:
    cfg = _pretrained_cfg(pretrained_name, model_key)
    if not cfg.hf_hub_id:
        return False
    return any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, filename), str)
               for filename in ("model.safetensors", "pytorch_model.bin"))


def _pretrained_cfg(pretrained_name: str, model_key: str) -> Any:
    try:
        cfg = timm.get_pretrained_cfg(pretrained_name)
    except RuntimeError:  # timm: "Invalid pretrained tag (...) for <arch>"
        cfg = None
    if cfg is None:
        architecture = pretrained_name.split(".")[0]
        if not timm.is_model(architecture):  # a models.extra entry naming no timm architecture
            raise WeightsError(f"{model_key}: {architecture!r} is not a timm architecture (see timm.list_models())")
        raise WeightsError(f"{model_key}: timm has no pretrained weights {pretrained_name!r}; tags for "
                           f"{architecture}: {timm.list_pretrained(architecture + '.*') or 'none'}")
    return cfg


def _missing_message(pretrained_name: str, cfg: Any, model_key: str, error: Exception) -> str:
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set and they are not in the local Hugging Face cache"
    else:
        why = f"they are not in the local Hugging Face cache and could not be downloaded ({type(error).__name__})"
    cache = constants.HF_HUB_CACHE
    return (f"{model_key}: ImageNet weights {pretrained_name} (Hugging Face repo {cfg.hf_hub_id}) are "
            f"unavailable: {why} (cache: {cache}). To get them, {HOW_TO_PROVIDE.format(key=model_key)}")


def _read_state_dict(path: Path, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, or of a torch.save file read with weights_only=True
    (stated here, not left to a library default: unpickling anything else runs code from the file)."""
    save_hint = "save one with torch.save(model.state_dict(), path) or safetensors.torch.save_file"
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):  # torch refused to import a class or function
            raise WeightsError(f"{where}: {path} is refused: it holds Python objects besides tensors, and "
                               f"loading them could run code from the file; {save_hint}") from None
        raise WeightsError(f"{where}: {path} is not a readable state dict (not a torch.save file); {save_hint}") from None
    except (OSError, RuntimeError, ValueError, EOFError, safetensors.SafetensorError) as error:
        raise WeightsError(f"{where}: {path} is not a readable state dict ({str(error).splitlines()[0][:200]}); "
                           f"{save_hint}") from None
    return _unwrapped(state, path, where, save_hint)


def _unwrapped(state: Any, path: Path, where: str, save_hint: str) -> dict[str, torch.Tensor]:
    """{"state_dict": ...} or {"model": ...} unwrapped, DataParallel's "module." prefix dropped."""
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise WeightsError(f"{where}: {path} is not a state dict (a mapping of names to tensors); {save_hint}")
    return {key.removeprefix("module."): value for key, value in state.items()}


def _timm_filter(model: nn.Module):
    """The checkpoint filter timm applies for this architecture under pretrained=True (identity if none)."""
    module = sys.modules[type(model).__module__]
    found = getattr(module, "checkpoint_filter_fn", None) or getattr(module, "_filter_fn", None)
    if found is None:
        return lambda state, _model: state
    if len(inspect.signature(found).parameters) == 1:  # e.g. vgg's _filter_fn(state_dict)
        return lambda state, _model: found(state)
    return found


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier = model.pretrained_cfg.get("classifier") or "head"
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(f"{name}." for name in names)


def _head_keys(model: nn.Module) -> tuple[str, ...]:
    return tuple(key for key in model.state_dict() if key.startswith(_head_prefixes(model)))


def _adapt_input_convs(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Sum/repeat RGB first-conv weights when the model has another input channel count."""
    first = model.pretrained_cfg.get("first_conv")
    for name in (first,) if isinstance(first, str) else tuple(first or ()):
        key = f"{name}.weight"
        target = model.get_submodule(name).weight
        if key in state and state[key].shape[1] != target.shape[1]:
            state[key] = adapt_input_conv(target.shape[1], state[key])


def _load_backbone(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    head = _head_prefixes(model)
    expected = {key: value.shape for key, value in model.state_dict().items() if not key.startswith(head)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(key for key in set(state) & set(expected) if state[key].shape != expected[key])
    if missing or unexpected or wrong:
        raise WeightsError(f"{where} does not match {_architecture(model)}: " + "; ".join(
            f"{label} {_few(keys)}" for label, keys in (("missing", missing), ("unexpected", unexpected),
                                                        ("wrong shape", wrong)) if keys)
                           + ". Is it the state dict of this architecture?")
    model.load_state_dict(state, strict=False)


def _architecture(model: nn.Module) -> str:
    return model.pretrained_cfg.get("architecture") or type(model).__name__


def _few(keys: list[str], shown: int = 4) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
