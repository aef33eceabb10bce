"""The CAM engine (explain/cam.py): parity with pytorch-grad-cam 1.5.7 on every registry model,
hooks and graphs released, the caller's model untouched, ViT token handling."""

import copy
import dataclasses
import gc
import warnings

import pytest
import timm
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from explain import cam
from study import models
from training import registry
from study.errors import ConfigError
from tests.conftest import by_size

# ScoreCAM runs one forward per activation channel (hundreds): slow on a CPU
ALL_METHODS = [pytest.param(m, marks=pytest.mark.slow) if m == "scorecam" else m for m in cam.METHODS]
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny convs on 2 threads of a shared 2-core machine wait on OpenMP barriers (~40x slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_size(spec):
    return 32 if spec.token_reshape else 64  # ViT: 2x2 patch grid; CNN: 2x2 (ResNet) / 4x4 (VGG)


def build(name, size=None, seed=0):
    spec = registry.get(name)
    torch.manual_seed(seed)
    model = registry.build_model(spec, init="random", image_size=size or small_size(spec))
    return spec, model


def images(spec, batch=2, size=None, seed=1):
    size = size or small_size(spec)
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def resnet18():
    return build("resnet18")


@pytest.fixture(scope="module")
def vit_small():
    return build("vit_small")


def library_cam(cls, model, spec, x, targets):
    """pytorch-grad-cam's own class on a copy whose in-place activations are turned off.

    Trap (docs/STUDY.md §3): on CPU the library stores `output.cpu().detach()`, which is the very
    tensor that VGG's ReLU(inplace=True) after the target conv overwrites next, so it would
    weight ReLU(A) while its gradient hook (registered before the in-place op) still sees
    dScore/dA of the conv output. On GPU `.cpu()` copies and the library uses A. Our engine
    continues the forward from a clone, so it always uses A: the reference must too.
    """
    model = copy.deepcopy(model)
    for module in model.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    layer = registry.resolve_layer(model, spec.target_layer)
    reshape = (lambda t: cam.tokens_to_map(model, t)) if spec.token_reshape else None
    with cls(model, [layer], reshape_transform=reshape) as explainer:
        return torch.from_numpy(explainer(x, targets=[ClassifierOutputTarget(int(t)) for t in targets]))


# ---------------------------------------------------------------- parity

@pytest.mark.parametrize("name", by_size(registry.names()))
def test_gradcam_matches_pytorch_grad_cam(name):
    spec, model = build(name)
    x = images(spec)
    ours = cam.compute(model, spec, x, [1, 0])
    ref = library_cam(GradCAM, model, spec, x, [1, 0])
    assert ours.shape == ref.shape == (2, *x.shape[-2:])
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert ours.amax() > 0.99  # not vacuous: some map is not all-zero (ReLU may kill a 2x2 one)


@pytest.mark.parametrize("method, cls", [("gradcam++", GradCAMPlusPlus), ("hirescam", HiResCAM),
                                         ("layercam", LayerCAM)])
@pytest.mark.parametrize("model_name", ["resnet18", "vit_small"])
def test_other_gradient_methods_match_pytorch_grad_cam(method, cls, model_name, request):
    spec, model = request.getfixturevalue(model_name)
    x = images(spec)
    torch.testing.assert_close(cam.compute(model, spec, x, 1, method),
                               library_cam(cls, model, spec, x, [1, 1]), rtol=0, atol=1e-5)


@pytest.mark.slow  # builds VGG-16 (134 M parameters)
def test_inplace_relu_aliases_the_librarys_activation_on_cpu():
    spec, model = build("vgg16")
    layer = registry.resolve_layer(model, spec.target_layer)  # features.28, then ReLU(inplace)
    x = images(spec, batch=1)
    a, g = cam.activation_and_gradient(model, layer, x, torch.tensor([1]), lambda t: t)
    assert (a < 0).any()  # the conv output itself, not its ReLU
    library_model = copy.deepcopy(model)
    explainer = GradCAM(library_model, [registry.resolve_layer(library_model, spec.target_layer)])
    try:
        explainer(x, targets=[ClassifierOutputTarget(1)])
        stored = explainer.activations_and_grads.activations[0]
        stored_grad = explainer.activations_and_grads.gradients[0]
    finally:
        explainer.activations_and_grads.release()
    torch.testing.assert_close(stored, a.clamp(min=0))  # what the library used instead of A
    torch.testing.assert_close(stored_grad, g)  # while its gradient is still dScore/dA


# ---------------------------------------------------------------- layer sweep (docs/STUDY.md §9)

@pytest.mark.parametrize("name", by_size(registry.names()))
def test_one_sweep_equals_separate_single_layer_calls(name, monkeypatch):
    """Every stage layer and method from one forward and one autograd.grad call, equal to one
    call per layer to 1e-6; the model comes back unchanged."""
    spec, model = build(name)
    layers = models.cam_layers(spec, models.LAYER_ARMS)
    x = images(spec)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hooks(model)
    forwards, grads = [], []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: grads.append(1) or real_grad(*a, **k))
    handle = model.register_forward_pre_hook(lambda m, i: forwards.append(1))
    try:
        swept = cam.sweep(model, spec, x, [1, 0], layers, ["gradcam", "layercam"])
    finally:
        handle.remove()
    assert len(forwards) == 1 and len(grads) == 1
    assert list(swept) == layers and all(set(maps) == {"gradcam", "layercam"} for maps in swept.values())
    monkeypatch.setattr(torch.autograd, "grad", real_grad)
    for layer in layers:
        alone = dataclasses.replace(spec, target_layer=layer)
        for method in ("gradcam", "layercam"):
            torch.testing.assert_close(swept[layer][method], cam.compute(model, alone, x, [1, 0], method),
                                       rtol=0, atol=1e-6, msg=f"{layer} {method}")
    assert _hooks(model) == hooks and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert any(maps["gradcam"].amax() > 0.99 for maps in swept.values())  # not vacuous


def test_sweep_layers_and_their_geometry_come_from_the_registry():
    spec = registry.get("resnet50")
    assert models.cam_layers(spec, ["final"]) == ["layer4.-1"]
    assert models.cam_layers(spec, ["final", "matched"]) == ["layer3.-1", "layer4.-1"]
    geometry = registry.layer_geometry(spec, tuple(models.cam_layers(spec, models.LAYER_ARMS)), 224)
    assert [size for _, size in geometry.values()] == [56, 28, 14, 7]
    depths = [depth for depth, _ in geometry.values()]
    assert depths == sorted(depths) and 0 < depths[0] and depths[-1] < 1
    for name in registry.names():  # the matched arm: one map size (14 at 224 px) for every model
        spec = registry.get(name)
        assert registry.layer_geometry(spec, (spec.matched_layer,), 224)[spec.matched_layer][1] == 14
    extra = dataclasses.replace(spec, stage_layers=(), matched_layer=None)
    with pytest.raises(ConfigError, match="declares no stage_layers"):
        models.cam_layers(extra, ["final", "stages"])


# ---------------------------------------------------------------- nothing outlives a call

def _hooks(model):
    return {(name, attr): len(getattr(module, attr, {})) for name, module in model.named_modules()
            for attr in HOOK_DICTS}


def _global_hooks():
    m = torch.nn.modules.module
    return [len(getattr(m, n)) for n in dir(m) if n.startswith("_global_") and n.endswith("hooks")]


def _graph_tensors():
    """Live tensors that belong to an autograd graph (parameters aside)."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on torch.distributed's deprecated objects
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)
                   and not isinstance(o, torch.nn.Parameter) and (o.requires_grad or o.grad_fn is not None))


@pytest.mark.slow  # 100 calls, and a scan of every live object after them
def test_no_hook_graph_or_grad_survives_100_calls():
    spec, model = build("resnet18", size=32)
    model.train()
    model.layer2.eval()  # a mixed state must come back as it was
    frozen = [p for n, p in model.named_parameters() if n.startswith("layer1")]
    for p in frozen:
        p.requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks, global_hooks, graphs = _hooks(model), _global_hooks(), _graph_tensors()
    x = images(spec, batch=2, size=32)
    first = cam.compute(model, spec, x, 1)
    for _ in range(99):
        out = cam.compute(model, spec, x, 1)
        assert not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(out, first, rtol=0, atol=0)  # eval mode inside: BN stats untouched
    assert _hooks(model) == hooks and _global_hooks() == global_hooks
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    del out, first
    assert _graph_tensors() == graphs


def model_for(method, resnet18, vit_small):
    # ScoreCAM runs one forward per channel: 384 tiny ViT forwards beat 512 ResNet ones
    return vit_small if method in ("rollout", "scorecam") else resnet18


def test_autograd_starts_at_the_target_layer(resnet18):
    spec, model = resnet18
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = output.requires_grad
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n]
    try:
        cam.compute(model, spec, images(spec), 1)
    finally:
        for handle in handles:
            handle.remove()
    # the target's own output, seen by a hook registered before ours, is not in a graph either
    trunk = [n for n in seen if not n.startswith(("layer4.1.", "global_pool", "fc")) and n != "layer4"]
    assert not any(seen[n] for n in trunk), [n for n in trunk if seen[n]]
    assert seen["global_pool"] and seen["fc"] and seen["layer4"]


def test_the_engine_implements_exactly_the_configs_methods():
    from study.config import CAM_METHODS

    assert cam.METHODS is CAM_METHODS
    assert sorted(CAM_METHODS) == sorted([*cam.GRADIENT_METHODS, *cam.LIBRARY_METHODS, "rollout"])


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_releases_hooks_and_restores_state(method, resnet18, vit_small):
    spec, model = model_for(method, resnet18, vit_small)
    model.train()
    hooks = _hooks(model)
    flags = [p.requires_grad for p in model.parameters()]
    cam.compute(model, spec, images(spec, batch=1), 1, method)
    assert _hooks(model) == hooks and model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    model.eval()


# ---------------------------------------------------------------- targets

def test_targets_one_per_image(resnet18):
    spec, model = resnet18
    x = images(spec, batch=3)
    with pytest.raises(ValueError, match="one target per image"):
        cam.compute(model, spec, x, [1, 0])
    with pytest.raises(ValueError, match="one target per image"):
        cam.compute(model, spec, x, torch.tensor([1, 0, 1, 1]))
    with pytest.raises(ValueError, match="outside"):
        cam.compute(model, spec, x, 2)
    mixed = cam.compute(model, spec, x, torch.tensor([0, 1, 0]))
    single = torch.cat([cam.compute(model, spec, x[i:i + 1], t) for i, t in enumerate([0, 1, 0])])
    torch.testing.assert_close(mixed, single, rtol=0, atol=1e-5)
    torch.testing.assert_close(cam.compute(model, spec, x, 1), cam.compute(model, spec, x, [1, 1, 1]))


def test_unknown_method_and_rollout_on_a_cnn(resnet18):
    spec, model = resnet18
    with pytest.raises(ConfigError, match="unknown method"):
        cam.compute(model, spec, images(spec), 1, "smoothgrad")
    with pytest.raises(ConfigError, match="needs a ViT"):
        cam.compute(model, spec, images(spec), 1, "rollout")


# ---------------------------------------------------------------- ViT tokens

@pytest.mark.parametrize("layer", ["blocks.-1.norm2", "norm", "blocks.-1.mlp.fc1", "blocks.-1"])
def test_vit_dead_token_layers_are_refused(layer, vit_small):
    spec, model = vit_small
    x = images(spec)
    dead = dataclasses.replace(spec, target_layer=layer)
    with pytest.raises(ConfigError, match="exactly zero"):
        cam.compute(model, dead, x, 1)
    # why: with a CLS-token head these patch tokens get exactly zero gradient
    _, g = cam.activation_and_gradient(model, registry.resolve_layer(model, layer), x,
                                       torch.tensor([1, 1]), lambda t: cam.tokens_to_map(model, t))
    assert torch.count_nonzero(g) == 0


def manual_vit_gradcam(model, x, target):
    """Grad-CAM the plain way: full backward, retain_grad on blocks[-1].norm1, CLS dropped,
    patch tokens laid out row-major over patch_embed.grid_size."""
    model = copy.deepcopy(model).eval()
    store = {}

    def keep(module, inputs, output):
        output.retain_grad()
        store["a"] = output

    handle = model.blocks[-1].norm1.register_forward_hook(keep)
    model(x)[:, target].sum().backward()
    handle.remove()
    a, g = store["a"][:, 1:].detach(), store["a"].grad[:, 1:]
    gh, gw = model.patch_embed.grid_size
    return torch.relu((a * g.mean(dim=1, keepdim=True)).sum(-1)).reshape(len(x), gh, gw)


@pytest.mark.parametrize("size, grid", [(32, (2, 2)), ((32, 48), (2, 3)), (48, (3, 3))])
def test_vit_grid_comes_from_patch_embed(size, grid):
    spec = registry.get("vit_small")
    torch.manual_seed(0)
    model = timm.create_model(spec.timm_name, num_classes=2, img_size=size)
    hw = (size, size) if isinstance(size, int) else size
    x = torch.randn(2, 3, *hw)
    assert tuple(model.patch_embed.grid_size) == grid
    a, g = cam.activation_and_gradient(model, registry.resolve_layer(model, spec.target_layer), x,
                                       torch.tensor([1, 1]), lambda t: cam.tokens_to_map(model, t))
    assert a.shape == (2, model.embed_dim, *grid)
    raw = torch.relu((a * g.mean(dim=(2, 3), keepdim=True)).sum(1))
    expected = manual_vit_gradcam(model, x, 1)
    torch.testing.assert_close(raw, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cam.compute(model, spec, x, 1), cam.normalise(expected, hw),
                               rtol=0, atol=1e-5)


def test_tokens_that_do_not_fill_the_grid_are_an_error(vit_small):
    _, model = vit_small
    with pytest.raises(ValueError, match="grid_size"):
        cam.tokens_to_map(model, torch.zeros(1, 1 + 9, 8))


# ---------------------------------------------------------------- all-zero maps and ranges

def test_all_zero_cam_stays_all_zero():
    spec, model = build("resnet18")
    with torch.no_grad():
        model.fc.weight.zero_()  # dScore/dA = 0 everywhere
    out = cam.compute(model, spec, images(spec), 1)
    assert torch.count_nonzero(out) == 0 and not out.isnan().any()
    assert torch.count_nonzero(cam.normalise(-torch.rand(2, 3, 3), (8, 8))) == 0  # ReLU kills all
    assert torch.count_nonzero(cam.normalise(torch.full((2, 3, 3), 0.7), (8, 8))) == 0  # constant


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_gives_b_h_w_in_unit_range(method, resnet18, vit_small):
    spec, model = model_for(method, resnet18, vit_small)
    x = images(spec, batch=2)
    out = cam.compute(model, spec, x, 1, method)
    assert out.shape == (2, *x.shape[-2:]) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1 and not out.isnan().any()
    assert out.amax(dim=(1, 2)).gt(0.99).all()


def test_library_methods_on_a_vit(vit_small):
    spec, model = vit_small
    out = cam.compute(model, spec, images(spec), 1, "eigencam")
    assert out.shape == (2, 32, 32) and 0 <= out.min() and out.max() <= 1


def test_rollout_rows_are_attention_weighted(vit_small):
    spec, model = vit_small
    x = images(spec)
    raw = cam._rollout(model, x)
    assert raw.shape == (2, 2, 2)
    assert (raw > 0).all() and (raw.sum(dim=(1, 2)) < 1).all()  # rollout rows are distributions


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run bench/gpu_checks.sh on one)")
@pytest.mark.parametrize("name", ["resnet18", "vgg16", "vit_small"])
def test_cuda_cam_stays_on_the_gpu_and_equals_the_cpu_cam(name, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 convs would differ by ~1e-3
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    spec, model = build(name)
    x = images(spec, batch=4)
    on_cpu = cam.compute(model, spec, x, 1)
    on_gpu = cam.compute(model.cuda(), spec, x.cuda(), 1)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=0)
