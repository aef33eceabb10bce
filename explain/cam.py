"""The CAM engine: heatmaps (B, H, W) in [0, 1] for a batch of images (docs/STUDY.md §4).

Gradient methods are a template: the engine captures the target layer's activation A and the
class score's gradient G = dScore/dA, a method is only its weights function w(A, G), and the map
is ReLU(sum_c w * A). Autograd starts at the target layer: a forward hook detaches A into a
leaf and the rest of the forward continues from a copy of it, parameters are frozen for the
call, and `torch.autograd.grad` returns G alone, so there are no weight gradients and no
backward pass through the trunk before the target layer.

Normalisation is pytorch-grad-cam 1.5.7's (`BaseCAM.compute_cam_per_layer`, then
`aggregate_multi_layers`): ReLU; per-image (x - min) / (1e-7 + max(x - min)) (`scale_cam_image`);
bilinear resize to the input size (cv2.resize INTER_LINEAR = align_corners=False); ReLU and the
same min-max again. An all-zero (or constant) map comes out all-zero.

ScoreCAM and EigenCAM run through pytorch-grad-cam's own classes (same normalisation); attention
rollout (Abnar & Zuidema 2020) is implemented here for ViTs.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from study.config import CAM_METHODS
from study.errors import ConfigError
from training.registry import ModelSpec, resolve_layer

Weights = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Targets = Union[int, Sequence[int], torch.Tensor]


# ---------------------------------------------------------------- gradient methods: w(A, G)
# A, G: (B, C, h, w). Each returns weights broadcastable to A.

def _gradcam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return g.mean(dim=(2, 3), keepdim=True)  # Selvaraju et al. 2017: spatial mean of dScore/dA


def _gradcam_pp(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    # Chattopadhay et al. 2018, eq. 19, as pytorch-grad-cam 1.5.7 (eps 1e-6; alpha = 0 where G = 0)
    g2 = g * g
    alpha = g2 / (2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g2 * g + 1e-6)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    return (g.clamp(min=0) * alpha).sum(dim=(2, 3), keepdim=True)


def _hirescam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return g  # Draelos & Carin 2020: element-wise G * A, no spatial averaging


def _layercam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return g.clamp(min=0)  # Jiang et al. 2021: element-wise ReLU(G) * A


GRADIENT_METHODS: dict[str, Weights] = {
    "gradcam": _gradcam, "gradcam++": _gradcam_pp, "hirescam": _hirescam, "layercam": _layercam,
}
LIBRARY_METHODS = ("scorecam", "eigencam")  # pytorch_grad_cam.ScoreCAM / EigenCAM
# The methods are the config's (`cam.methods` accepts these and no other); each is implemented
# above, in LIBRARY_METHODS, or is "rollout" (tests/explain/test_cam.py checks the two agree)
METHODS = CAM_METHODS


# ---------------------------------------------------------------- public entry points

def compute(model: nn.Module, spec: ModelSpec, images: torch.Tensor, target_class: Targets,
            method: str = "gradcam") -> torch.Tensor:
    """Heatmaps (B, H, W) float32 in [0, 1] on the images' device, for `target_class`'s logit, at
    the spec's target layer (the paper's).

    target_class: one int for every image, or one per image (list or 1-D tensor of length B).
    The model comes back as it was: train/eval mode, requires_grad flags and `.grad` untouched,
    no hook left behind. `rollout` ignores the target (it is class-agnostic).
    """
    return sweep(model, spec, images, target_class, [spec.target_layer], [method])[spec.target_layer][method]


def sweep(model: nn.Module, spec: ModelSpec, images: torch.Tensor, target_class: Targets,
          layers: Sequence[str], methods: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """layer -> method -> heatmaps (B, H, W), as `compute` gives for each, for every layer and method.

    Every gradient method at every layer comes from one forward and one `torch.autograd.grad`
    call (autograd starts at the shallowest layer; the deeper layers' outputs are graph nodes
    between it and the score). pytorch-grad-cam's methods run once per layer; `rollout` has no
    layer and is given at the spec's target layer only.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W); got shape {tuple(images.shape)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"cam.methods: unknown method {unknown[0]!r}; use one of {', '.join(METHODS)}")
    targets = _targets(target_class, len(images), images.device)
    size = tuple(images.shape[-2:])
    maps: dict[str, dict[str, torch.Tensor]] = {layer: {} for layer in layers}
    gradient = [m for m in methods if m in GRADIENT_METHODS]
    if gradient:
        for layer, (a, g) in zip(layers, _layer_gradients(model, spec, images, targets, layers)):
            for method in gradient:
                maps[layer][method] = normalise((GRADIENT_METHODS[method](a, g) * a).sum(dim=1), size)
    for method in (m for m in methods if m in LIBRARY_METHODS):
        for layer in layers:
            maps[layer][method] = _library_cam(model, spec, images, targets, method, layer)
    if "rollout" in methods and spec.target_layer in maps:
        maps[spec.target_layer]["rollout"] = normalise(_rollout(model, images), size)
    return maps


def _layer_gradients(model: nn.Module, spec: ModelSpec, images: torch.Tensor, targets: torch.Tensor,
                     layers: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, G) in float32 per layer, both (B, C, h, w)."""
    modules = [resolve_layer(model, layer) for layer in layers]
    for layer, module in zip(layers, modules):
        _refuse_dead_token_layer(model, spec, module, layer)
    pairs = activations_and_gradients(model, modules, images, targets, _layer_map(model, spec))
    return [(a.float(), g.float()) for a, g in pairs]  # bf16/fp16 under autocast: weight and sum in float32


def normalise(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) raw map -> (B, H, W) in [0, 1], exactly as pytorch-grad-cam 1.5.7."""
    cam = _min_max(cam.float().clamp(min=0))
    cam = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return _min_max(cam.clamp(min=0))


def _min_max(cam: torch.Tensor) -> torch.Tensor:
    cam = cam - cam.amin(dim=(1, 2), keepdim=True)
    return cam / (1e-7 + cam.amax(dim=(1, 2), keepdim=True))  # scale_cam_image's epsilon


def _targets(target_class: Targets, batch: int, device: torch.device) -> torch.Tensor:
    targets = torch.as_tensor(target_class, dtype=torch.long, device=device)
    if targets.ndim == 0:
        return targets.expand(batch)
    if targets.ndim != 1 or len(targets) != batch:
        raise ValueError(f"target_class: give one int, or one target per image; got "
                         f"{tuple(targets.shape)} targets for a batch of {batch}")
    return targets


# ---------------------------------------------------------------- A and dScore/dA

class _Capture:
    """Forward hooks on the target layers. The first of them to run becomes a leaf, so autograd
    starts there (no backward through the trunk before it); each later one is kept as the graph
    node it is. The forward continues from a copy of each, so an in-place op after a layer (VGG's
    ReLU(inplace=True) after a conv) rewrites the copy and A stays the layer's output."""

    def __init__(self, count: int):
        self.outputs: list[torch.Tensor | None] = [None] * count
        self.calls = [0] * count
        self.leaf: torch.Tensor | None = None

    def hook(self, index: int) -> Callable:
        def capture(module: nn.Module, inputs: Any, output: Any) -> torch.Tensor:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"the target layer {type(module).__name__} returns {type(output).__name__}, "
                                f"not a tensor; choose a layer with a tensor output")
            self.calls[index] += 1
            if self.leaf is None:
                output = self.leaf = output.detach().requires_grad_(True)
            self.outputs[index] = output
            return output.clone()
        return capture


@contextmanager
def model_output(model: nn.Module) -> Iterator[dict]:
    """{"output": the model's output (detached)} of its last forward inside the block: the logits
    a CAM's own forward computed, for the caller that also needs the class (no second forward)."""
    found: dict = {}
    handle = model.register_forward_hook(lambda module, args, output: found.__setitem__("output", output.detach()))
    try:
        yield found
    finally:
        handle.remove()


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and requires_grad=False for the call; each module's mode and each flag restored."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training


def activation_and_gradient(model: nn.Module, layer: nn.Module, images: torch.Tensor,
                            targets: torch.Tensor,
                            to_map: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A and dScore/dA at `layer`, both (B, C, h, w) after `to_map`; Score = sum of target logits."""
    return activations_and_gradients(model, [layer], images, targets, to_map)[0]


def activations_and_gradients(model: nn.Module, layers: Sequence[nn.Module], images: torch.Tensor,
                              targets: torch.Tensor, to_map: Callable[[torch.Tensor], torch.Tensor]
                              ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A and dScore/dA at each of `layers` (one forward, one autograd.grad call)."""
    unique = list({id(m): m for m in layers}.values())  # two paths to one module: one hook
    capture = _Capture(len(unique))
    handles = [m.register_forward_hook(capture.hook(i)) for i, m in enumerate(unique)]
    try:
        with _frozen(model), torch.inference_mode(False), torch.enable_grad():
            logits = model(images)
            if any(calls != 1 for calls in capture.calls):
                raise ValueError(f"a target layer ran {max(capture.calls)} times in one forward; it must run once")
            _check_targets(targets, logits)
            score = logits.gather(1, targets[:, None]).sum()  # images are independent in eval mode
            wanted = [i for i, out in enumerate(capture.outputs) if out.requires_grad]
            grads = torch.autograd.grad(score, [capture.outputs[i] for i in wanted], allow_unused=True)  # frees the graph
    finally:
        for handle in handles:
            handle.remove()
    by_index = dict(zip(wanted, grads))
    pairs = {}
    for i, out in enumerate(capture.outputs):
        activation = out.detach()
        grad = by_index.get(i)
        grad = torch.zeros_like(activation) if grad is None else grad  # layer not on the score's path
        pairs[id(unique[i])] = (to_map(activation), to_map(grad))
    return [pairs[id(m)] for m in layers]


def _check_targets(targets: torch.Tensor, logits: torch.Tensor) -> None:
    if len(targets) and (targets.min() < 0 or targets.max() >= logits.shape[1]):
        raise ValueError(f"target_class: {targets.tolist()} outside the model's "
                         f"{logits.shape[1]} classes")


# ---------------------------------------------------------------- ViT tokens

def _layer_map(model: nn.Module, spec: ModelSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    return (lambda t: tokens_to_map(model, t)) if spec.token_reshape else (lambda t: t)


def tokens_to_map(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(B, prefix + gh*gw, C) -> (B, C, gh, gw): prefix (CLS, register) tokens dropped, grid from
    `patch_embed.grid_size` (14x14 only for 224 px and 16 px patches)."""
    gh, gw = model.patch_embed.grid_size
    patches = tokens[:, model.num_prefix_tokens:]
    if patches.shape[1] != gh * gw:
        raise ValueError(f"{patches.shape[1]} patch tokens do not fill patch_embed.grid_size "
                         f"{gh}x{gw}; feed images of the size the model was built for")
    return patches.reshape(len(tokens), gh, gw, -1).permute(0, 3, 1, 2)


def _refuse_dead_token_layer(model: nn.Module, spec: ModelSpec, layer: nn.Module, path: str) -> None:
    """With a CLS-token head, patch tokens after the last block's attention never reach the score."""
    if not spec.token_reshape or getattr(model, "global_pool", None) != "token":
        return
    last = model.blocks[-1]
    feeding_cls = {m for name in ("norm1", "attn.qkv", "attn.q_norm", "attn.k_norm")
                   for m in _submodule(last, name).modules()}
    dead = {getattr(model, "norm", None), *(set(last.modules()) - feeding_cls)}
    if layer in dead:
        raise ConfigError(
            f"target layer {path!r} of {spec.name}: the model classifies from the CLS "
            f"token, and patch tokens after the last block's attention (its norm2, mlp, output, the "
            f"final norm) never reach it, so dScore/dA is exactly zero on every patch and every "
            f"Grad-CAM map would be all-zero; use 'blocks.-1.norm1' (docs/STUDY.md §3)")


def _submodule(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return nn.Identity()  # absent (another timm version): a fresh module matches nothing
    return module


# ---------------------------------------------------------------- pytorch-grad-cam methods

def _library_cam(model: nn.Module, spec: ModelSpec, images: torch.Tensor, targets: torch.Tensor,
                 method: str, layer_path: str) -> torch.Tensor:
    from pytorch_grad_cam import EigenCAM, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = resolve_layer(model, layer_path)
    cls = {"scorecam": ScoreCAM, "eigencam": EigenCAM}[method]
    # Tokens are reshaped as for our methods; maps are cloned in the library's hook, because on
    # CPU its `.cpu().detach()` aliases the tensor that a following in-place ReLU overwrites.
    reshape = _layer_map(model, spec) if spec.token_reshape else torch.clone
    with _frozen(model):
        explainer = cls(model, [layer], reshape_transform=reshape)
        try:
            cams = explainer(images, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        finally:
            explainer.activations_and_grads.release()
    return torch.from_numpy(cams).to(images.device)


# ---------------------------------------------------------------- attention rollout

def _rollout(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Abnar & Zuidema 2020: head-averaged attention A_l, Ã_l = (A_l + I)/2, R = Ã_L ... Ã_1;
    the map is the CLS token's row of R over the patches (mean patch row for pooled heads)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "patch_embed"):
        raise ConfigError(f"cam.methods: 'rollout' needs a ViT (blocks with attention); "
                          f"{type(model).__name__} has none")
    attention: list[torch.Tensor] = []
    handles = [b.attn.register_forward_hook(lambda m, i, o: attention.append(_attention(m, i[0])))
               for b in blocks]
    try:
        with _frozen(model), torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    eye = torch.eye(attention[0].shape[-1], device=images.device, dtype=attention[0].dtype)
    rollout = eye.expand_as(attention[0])
    for a in attention:
        rollout = (0.5 * a + 0.5 * eye) @ rollout
    prefix = model.num_prefix_tokens
    rows = rollout[:, :1] if getattr(model, "global_pool", None) == "token" else rollout[:, prefix:]
    return tokens_to_map(model, rows.mean(dim=1)[:, :, None])[:, 0]  # (B, N) as 1-channel tokens


def _attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Head-averaged softmax attention (B, N, N) of a timm `Attention` for its input x (B, N, D)."""
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)
