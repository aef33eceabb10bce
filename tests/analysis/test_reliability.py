"""Map reliability (docs/STUDY.md §10): the cascade on a tiny trained model, stability, the pass line,
equivalence and power against published values, the hierarchical bootstrap."""

import numpy as np
import pytest
import torch

from analysis import equivalence
from explain import cam
from explain.randomization import Cascade, twin
from explain.similarity import similarity
from tests.conftest import ROOT, make_tiny_cache
from training import registry
from training.cache import load_split
from study.config import StudyConfig, load_config
from training.loop import train_run


ALPHA = StudyConfig().statistics.alpha

# R package `equivalence`, tost() on the `clinic` data (as recorded in statsmodels' test_tost.py):
# paired differences of var1 and var2 between the first and the last 15 subjects, eps = 0.6
CLINIC = np.array([
    [2.84, 4.00], [2.51, 3.26], [2.41, 4.14], [2.95, 3.42], [3.14, 3.25], [3.79, 4.34], [4.14, 4.97],
    [3.85, 4.31], [3.02, 3.11], [3.45, 3.41], [5.37, 5.02], [3.81, 4.21], [4.19, 4.59], [3.16, 5.30],
    [3.84, 4.32], [2.60, 3.76], [2.82, 3.66], [2.18, 3.65], [3.46, 3.60], [4.01, 3.48], [3.04, 2.87],
    [3.47, 3.24], [4.06, 3.92], [2.91, 3.99], [3.59, 4.21], [4.51, 4.21], [3.16, 3.31], [3.86, 3.61],
    [3.31, 2.97], [3.02, 2.73]])
R_TOST_P = {0: 0.003166881489265175, 1: 0.4412034046017588}  # var1: equivalent; var2: not


@pytest.mark.parametrize("column", [0, 1])
def test_paired_tost_reproduces_r_equivalence(column):
    x, y = CLINIC[:15, column], CLINIC[15:, column]
    assert equivalence.tost_paired(x, y, 0.6) == pytest.approx(R_TOST_P[column], rel=1e-9)


def test_minimum_detectable_difference_matches_the_published_sample_size():
    """pwr.t.test(d = 0.5, sig.level = 0.05, power = 0.8, type = "paired") gives n = 33.367 (Cohen
    1988's d = 0.5 example): at that n the MDE of differences with SD 1 is 0.5."""
    from statsmodels.stats.power import TTestPower

    assert TTestPower().solve_power(effect_size=0.5, alpha=0.05, power=0.8) == pytest.approx(33.367, abs=1e-3)
    rng = np.random.default_rng(0)
    mde = {}
    for n in (33, 34):  # either side of the published 33.367 pairs
        differences = rng.normal(0, 1, n)
        differences = (differences - differences.mean()) / differences.std(ddof=1)  # SD exactly 1
        mde[n] = equivalence.minimum_detectable_difference(differences, 0.05, 0.8)
        assert equivalence.minimum_detectable_difference(3 * differences, 0.05, 0.8) == pytest.approx(3 * mde[n])
    assert mde[34] < 0.5 < mde[33] and mde[33] - mde[34] < 0.01


def test_the_hierarchical_bootstrap_is_seeded_and_resamples_seeds_too():
    rng = np.random.default_rng(1)
    groups = [rng.normal(shift, 1, 200) for shift in (0.0, 0.5, 1.0)]  # three seeds that disagree
    first = equivalence.hierarchical_bootstrap(groups, 2000, seed=7, alpha=ALPHA, stream="m")
    assert first == equivalence.hierarchical_bootstrap(groups, 2000, seed=7, alpha=ALPHA, stream="m")  # reproducible
    assert first != equivalence.hierarchical_bootstrap(groups, 2000, seed=8, alpha=ALPHA, stream="m")
    mean, lo, hi = first
    assert mean == pytest.approx(np.concatenate(groups).mean()) and lo < mean < hi
    images_only = equivalence.hierarchical_bootstrap([np.concatenate(groups)], 2000, seed=7, alpha=ALPHA)
    assert hi - lo > 2 * (images_only[2] - images_only[1])  # seed-to-seed spread widens the interval


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """A resnet18 trained 3 epochs on 64-px tiny data (a 2x2 layer4 map), and its test images."""
    root = tmp_path_factory.mktemp("cascade")
    make_tiny_cache(root / "cache", size=64)
    config = load_config(ROOT / "configs" / "demo.yaml", {
        "storage": str(root / "store"), "models.names": ["resnet18"], "preprocess.image_size": 64,
        "recipes.resnet.epochs": 3, "training.batch_size": 16})
    spec = registry.get("resnet18")
    train_run(spec, registry.recipe_for(spec, config.recipes), config, root / "cache", root / "run", 0)
    from training.loop import load_trained_model

    model = load_trained_model(spec, config, root / "run")
    test = load_split(root / "cache", "test")
    images = test.images[test.labels == 1].float().expand(-1, 3, -1, -1)
    return spec, config, model, images


@pytest.mark.slow  # trains a resnet18 for 3 epochs at 64 px
def test_the_cascade_falls_from_the_trained_map_to_the_pass_line(trained_tiny):
    """Step 0 is the trained map (similarity 1); re-initialising from the head down takes the maps
    away from it, and with every unit re-initialised they are no more like the trained maps than
    two different images' trained maps are (the pass line); the model comes back unchanged."""
    spec, config, model, images = trained_tiny
    torch.set_num_threads(1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trained = cam.compute(model, spec, images, 1).to(torch.float16)
    cascade = Cascade(model, twin(spec, config, 0, torch.device("cpu")),
                      registry.cascade_units(spec, 64))
    ssim = []
    for step, unit, copy in cascade.steps():
        maps = cam.compute(copy, spec, images, 1).to(torch.float16)
        ssim.append(float(np.nanmean(similarity(maps, trained)["ssim_to_trained"])))
    assert ssim[0] == 1.0 and len(ssim) == 6
    # every unit re-initialised is the twin itself: its maps, computed from the twin model
    torch.testing.assert_close(maps, cam.compute(cascade.twin, spec, images, 1).to(torch.float16), rtol=0, atol=2e-3)
    rng = np.random.default_rng(0)
    first = rng.integers(0, len(images), 50)
    second = (first + rng.integers(1, len(images), 50)) % len(images)
    pass_line = float(np.mean(similarity(trained[first], trained[second])["ssim_to_trained"]))
    assert ssim[-1] < pass_line < 1.0 and min(ssim[1:]) < 1.0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # only the copy was changed
    again = [float(np.nanmean(similarity(cam.compute(c, spec, images, 1).to(torch.float16), trained)["ssim_to_trained"]))
             for _, _, c in cascade.steps()]
    assert again == ssim  # restored after each pass: the cascade repeats exactly
