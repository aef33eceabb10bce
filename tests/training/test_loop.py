"""The training loop on the tiny synthetic cache (tests/conftest.py), and the batched augmentation it uses."""

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from study.config import AugmentConfig, ModelsConfig, PreprocessConfig, StudyConfig, TrainingConfig
from tests.conftest import TINY_SIZE as SIZE, TINY_SPLITS as SPLITS
from training import augment, loop, registry
from study.errors import TrainingError
from study.recipes import Recipe

RECIPE = Recipe("adam", 1e-3, 3)


@pytest.fixture(scope="module")
def cache(tiny_cache):
    return tiny_cache


@pytest.fixture(scope="module")
def config():
    return StudyConfig(preprocess=PreprocessConfig(image_size=SIZE), models=ModelsConfig(init="random"),
                       training=TrainingConfig(batch_size=16))


@pytest.fixture(scope="module")
def finished(cache, config, tmp_path_factory):
    """One uninterrupted run, shared by the tests that read its outputs."""
    run_dir = tmp_path_factory.mktemp("runs") / "resnet18-seed0"
    reports = []
    result = loop.train_run(registry.get("resnet18"), RECIPE, config, cache, run_dir, seed=0,
                            report=lambda epoch, metrics: reports.append((epoch, metrics)))
    return result, run_dir, reports


# --------------------------------------------------------------------------- training


@pytest.mark.slow
def test_resnet18_learns_the_easy_cache(finished):
    result, run_dir, reports = finished
    assert [epoch for epoch, _ in reports] == [1, 2, 3]
    assert max(m["val_auc"] for _, m in reports) > 0.8
    assert result.history[result.best_epoch - 1]["val_auc"] == max(m["val_auc"] for _, m in reports)
    assert result.test_metrics["auc"] > 0.8
    assert result.test_metrics["auc_lo"] < result.test_metrics["auc"] < result.test_metrics["auc_hi"]
    assert {"train_loss", "val_loss", "val_auc", "val_accuracy", "train_images_per_s"} <= set(reports[0][1])
    assert (result.resumed_from, result.skipped, result.weights) == (1, False, "random")


@pytest.mark.slow
def test_a_finished_run_leaves_its_outputs_and_is_skipped_on_rerun(finished, cache, config):
    result, run_dir, _ = finished
    assert sorted(p.name for p in run_dir.iterdir()) == ["done.json", "model.pt", "predictions.parquet",
                                                         "test_metrics.json"]
    predictions = pd.read_parquet(run_dir / "predictions.parquet")
    assert list(predictions.columns) == ["image_id", "label", "probability"]
    assert len(predictions) == SPLITS["test"] and predictions["image_id"].iloc[0] == "img128"
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert {"accuracy_lo", "precision_hi", "recall_lo", "auc_hi", "best_epoch"} <= set(metrics)
    model, spec = loop.load_trained(run_dir)
    assert spec == registry.get("resnet18")
    data = loop.load_device_split(cache, "test", torch.device("cpu"))
    _, probabilities = loop.evaluate(model, data, config, False, torch.device("cpu"))
    tolerance = 1e-2 if torch.cuda.is_available() else 1e-6  # the run predicted under bf16 autocast on CUDA
    np.testing.assert_allclose(probabilities, predictions["probability"], atol=tolerance)
    again = loop.train_run(registry.get("resnet18"), RECIPE, config, cache, run_dir, seed=0,
                           report=lambda *_: pytest.fail("a finished run must not train"))
    assert again.skipped and again.history == result.history


class Killed(Exception):
    pass


def _killed_run(cache, config, tmp_path, after_epoch: int):
    """A resnet18 run killed right after `after_epoch`'s checkpoint (its report); its folder."""
    def report(epoch, metrics):
        if epoch == after_epoch:
            raise Killed

    run_dir = tmp_path / "resnet18-seed0"
    with pytest.raises(Killed):
        loop.train_run(registry.get("resnet18"), RECIPE, config, cache, run_dir, seed=0, report=report)
    return run_dir


@pytest.mark.slow
def test_a_killed_run_resumes_and_matches_the_uninterrupted_one(finished, cache, config, tmp_path):
    run_dir = _killed_run(cache, config, tmp_path, after_epoch=1)
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "done.json").exists()
    with pytest.raises(TrainingError, match="other settings"):
        loop.train_run(registry.get("resnet18"), dataclasses.replace(RECIPE, lr=1e-2), config, cache, run_dir, seed=0)
    epochs = []
    resumed = loop.train_run(registry.get("resnet18"), RECIPE, config, cache, run_dir, seed=0,
                             report=lambda epoch, _: epochs.append(epoch))
    assert epochs == [2, 3] and resumed.resumed_from == 2
    assert [m["epoch"] for m in resumed.history] == [1, 2, 3]
    uninterrupted = finished[0]
    if torch.cuda.is_available():  # cuDNN's backward kernels are not bitwise reproducible
        assert [m["train_loss"] for m in resumed.history] == pytest.approx(
            [m["train_loss"] for m in uninterrupted.history], abs=0.05)
        return
    for key in ("train_loss", "val_loss", "val_auc"):  # on CPU, identical: RNG states are checkpointed too
        assert [m[key] for m in resumed.history] == pytest.approx([m[key] for m in uninterrupted.history], rel=1e-5)
    assert resumed.test_metrics["auc"] == pytest.approx(uninterrupted.test_metrics["auc"], rel=1e-5)


@pytest.mark.slow
def test_a_run_killed_after_its_last_checkpoint_only_tests_on_resume(finished, cache, config, tmp_path):
    run_dir = _killed_run(cache, config, tmp_path, after_epoch=RECIPE.epochs)
    assert "optimizer" not in torch.load(run_dir / loop.CHECKPOINT, weights_only=True)  # nothing follows it
    resumed = loop.train_run(registry.get("resnet18"), RECIPE, config, cache, run_dir, seed=0,
                             report=lambda *_: pytest.fail("every epoch was checkpointed"))
    uninterrupted = finished[0]
    assert resumed.best_epoch == uninterrupted.best_epoch
    tolerance = 0.05 if torch.cuda.is_available() else 1e-6  # cuDNN's backward is not bitwise reproducible
    assert resumed.test_metrics["auc"] == pytest.approx(uninterrupted.test_metrics["auc"], abs=tolerance)
    assert sorted(p.name for p in run_dir.iterdir()) == ["done.json", "model.pt", "predictions.parquet",
                                                         "test_metrics.json"]

@pytest.mark.slow  # trains until the loss is nan
def test_a_diverging_run_names_model_seed_and_epoch(cache, config, tmp_path):
    with pytest.raises(TrainingError, match=r"resnet18 seed 3: the (training|validation) loss is nan in epoch 1"):
        loop.train_run(registry.get("resnet18"), Recipe("sgd", 1e30, 2), config, cache, tmp_path / "run", seed=3)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("selection, scores, best, linked", [
    # linked: the best file that exists after each epoch (None: none); the last epoch needs none
    ("val_auc", [(0.7, 0.5), (0.9, 0.6), (0.8, 0.4)], 2, [1, 2, 2]),
    ("val_loss", [(0.7, 0.5), (0.9, 0.6), (0.8, 0.4)], 3, [1, 1, None]),
    ("last", [(0.7, 0.5), (0.9, 0.6), (0.8, 0.4)], 3, [None, None, None]),
])
def test_selection_keeps_the_chosen_epochs_checkpoint_as_a_link(tmp_path, selection, scores, best, linked):
    model = torch.nn.Linear(2, 2)
    state = loop.RunState(model, loop.make_optimizer(model, RECIPE), torch.Generator(), torch.Generator(), "random")
    weights = {}
    for epoch, (val_auc, val_loss) in enumerate(scores, start=1):
        state.epoch = epoch
        with torch.no_grad():
            model.weight.fill_(epoch)  # each epoch's weights are recognisable
        weights[epoch] = model.weight.clone()
        loop._select(state, {"epoch": epoch, "val_auc": val_auc, "val_loss": val_loss}, selection)
        final = epoch == RECIPE.epochs
        loop.save_checkpoint(tmp_path / loop.CHECKPOINT, state, "fp", optimizer=not final)
        loop._keep_best(tmp_path, state, RECIPE, selection)
        files = sorted(f.name for f in tmp_path.glob("best-e*.pt"))
        assert files == ([] if linked[epoch - 1] is None else [f"best-e{linked[epoch - 1]:04d}.pt"])
        if linked[epoch - 1] == epoch:  # the checkpoint itself, not a second write
            assert (tmp_path / files[0]).stat().st_ino == (tmp_path / loop.CHECKPOINT).stat().st_ino
        checkpoint = torch.load(tmp_path / loop.CHECKPOINT, weights_only=True)
        assert ("optimizer" in checkpoint) == (not final)
    assert state.best_epoch == best
    if best != RECIPE.epochs:  # the kept link still holds the best epoch's weights
        assert torch.equal(loop._read_best(tmp_path, best)["weight"], weights[best])


def test_a_crash_between_checkpoint_and_link_is_repaired_on_resume(tmp_path):
    model = torch.nn.Linear(2, 2)
    state = loop.RunState(model, loop.make_optimizer(model, RECIPE), torch.Generator(), torch.Generator(), "random")
    state.epoch = 1
    loop._select(state, {"epoch": 1, "val_auc": 0.7, "val_loss": 0.5}, "val_auc")
    loop.save_checkpoint(tmp_path / loop.CHECKPOINT, state, "fp")  # then the process dies: no link
    resumed = loop.RunState(model, loop.make_optimizer(model, RECIPE), torch.Generator(), torch.Generator(), "random")
    loop.load_checkpoint(tmp_path / loop.CHECKPOINT, resumed, "fp")
    loop._keep_best(tmp_path, resumed, RECIPE, "val_auc")  # what _start does after loading
    assert (tmp_path / "best-e0001.pt").is_file()


def test_best_files_of_older_runs_hold_a_bare_state_dict(tmp_path):
    model = torch.nn.Linear(2, 2)
    torch.save(model.state_dict(), tmp_path / "best-e0002.pt")
    assert torch.equal(loop._read_best(tmp_path, 2)["weight"], model.weight)


def test_an_undefined_validation_auc_is_an_error(tmp_path):
    model = torch.nn.Linear(2, 2)
    state = loop.RunState(model, loop.make_optimizer(model, RECIPE), torch.Generator(), torch.Generator(), "random")
    with pytest.raises(TrainingError, match="one class"):
        loop._select(state, {"epoch": 1, "val_auc": math.nan, "val_loss": 0.5}, "val_auc")


def test_batches_cover_every_image_once_and_drop_only_a_short_tail():
    batches = loop.batch_indices(10, 4, torch.Generator().manual_seed(0), drop_last=True)
    assert [len(b) for b in batches] == [4, 4]
    assert sorted(torch.cat(loop.batch_indices(10, 4)).tolist()) == list(range(10))
    assert [len(b) for b in loop.batch_indices(3, 4, torch.Generator(), drop_last=True)] == [3]


def test_grey_is_replicated_to_three_channels():
    images = torch.randn(2, 1, 8, 8).half()
    x = loop.prepare_input(images, 3, channels_last=False)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 8, 8) and x.is_contiguous()
    assert torch.equal(x[:, 0], x[:, 2]) and torch.equal(x[:, 1], images[:, 0].float())


# --------------------------------------------------------------------------- augmentation

ONLY = dict(noise_std=0.0, rotate_degrees=0.0, hflip_probability=0.0, brightness=0.0, contrast=0.0)


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_augment_keeps_shape_and_input_and_is_reproducible():
    x = torch.randn(8, 1, 16, 16)
    before = x.clone()
    a = augment.augment(x, AugmentConfig(), _generator(1))
    b = augment.augment(x, AugmentConfig(), _generator(1))
    c = augment.augment(x, AugmentConfig(), _generator(2))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(x, before)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_disabled_or_zero_augmentation_is_a_no_op():
    x = torch.randn(4, 3, 16, 16)
    assert augment.augment(x, AugmentConfig(enabled=False), _generator()) is x
    assert torch.equal(augment.augment(x, AugmentConfig(**ONLY), _generator()), x)


def test_flip_mirrors_columns_with_its_probability():
    x = torch.arange(4 * 16, dtype=torch.float32).view(4, 1, 4, 4)
    flipped = augment.augment(x, AugmentConfig(**{**ONLY, "hflip_probability": 1.0}), _generator())
    assert torch.equal(flipped, x.flip(-1))
    x = torch.zeros(2000, 1, 1, 2)
    x[..., 1] = 1.0  # a flipped image has its 1 in column 0
    assert 0.45 < augment.hflip(x, 0.5, _generator())[..., 0].mean().item() < 0.55
    assert torch.equal(augment.hflip(x, 0.0, _generator()), x)


def test_rotation_turns_about_the_centre():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 7] = 1.0  # right of the centre pixel
    turned = augment.rotate(x, torch.tensor([90.0]))
    assert torch.nonzero(turned[0, 0] > 0.5).tolist() == [[7, 4]]  # below it: clockwise on screen
    same = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(augment.rotate(same, torch.zeros(3)), same)


def test_rotation_angles_stay_within_the_configured_range():
    x = torch.zeros(200, 1, 33, 33)
    x[:, 0, 16, 16:] = 1.0  # a ray from the centre to the right edge
    out = augment.augment(x, AugmentConfig(**{**ONLY, "rotate_degrees": 10.0}), _generator())
    rows, cols = torch.meshgrid(torch.arange(33.0) - 16, torch.arange(33.0) - 16, indexing="ij")
    angle = torch.rad2deg(torch.atan2((out[:, 0] * rows).sum((1, 2)), (out[:, 0] * cols).sum((1, 2))))
    assert angle.abs().max() <= 10.5 and angle.abs().max() > 7 and angle.std() > 3


def test_brightness_contrast_and_noise_are_per_image_and_bounded():
    x = torch.randn(64, 1, 16, 16)
    shifted = augment.augment(x, AugmentConfig(**{**ONLY, "brightness": 0.2}), _generator())
    shift = (shifted - x).flatten(1)
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-6) and shift.abs().max() <= 0.2
    scaled = augment.augment(x, AugmentConfig(**{**ONLY, "contrast": 0.3}), _generator())
    factor = (scaled / x).flatten(1)
    assert torch.allclose(factor, factor[:, :1].expand_as(factor), atol=1e-4)
    assert ((factor - 1).abs() <= 0.3 + 1e-6).all()
    noisy = augment.augment(torch.zeros(16, 1, 64, 64), AugmentConfig(**{**ONLY, "noise_std": 0.05}), _generator())
    assert noisy.std().item() == pytest.approx(0.05, rel=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_runs_on_the_gpu_with_a_gpu_generator():
    x = torch.randn(8, 1, 32, 32, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    out = augment.augment(x, AugmentConfig(), generator)
    assert out.device == x.device and out.shape == x.shape
