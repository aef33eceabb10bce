"""The train stage's time-left estimate (orchestrator/train_runs.py StageProgress) comes from the
planned work and stays within a factor 2 of the true remaining time after the first minute: a
simulated demo stage on a fake clock, with the epoch costs measured on this 2-core machine."""

from __future__ import annotations

import pytest

from orchestrator.train_runs import StageProgress
from study.runs import plan_runs
from study.config import load_config
from study.store import StudyStore
from training import registry
from tests.conftest import ROOT

# docs/ARCHITECTURE.md's fact sheet: training images/s on this machine (random init, 2 threads)
IMAGES_PER_S = {"resnet18": 223, "resnet34": 115, "resnet50": 78, "resnet101": 46, "vit_small": 72, "vit_base": 18,
                "vgg16": 11, "vgg19": 10, "vit_large": 5}
TRAIN_IMAGES, START_UP_S = 110, 12.0  # the demo's training split; a run's Ray Train start-up


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def simulate(slots: int):
    """Run the demo's plans on `slots` slots, longest first (as the stage starts them); yield
    (estimate, true seconds left) every 2 s."""
    config = load_config(ROOT / "configs" / "demo.yaml", {"storage": "/tmp/unused-camstudy-store"})
    plans = registry.largest_first(plan_runs(config, StudyStore(config.study_dir)))
    clock = Clock()
    progress = StageProgress(config, plans, slots, clock=clock)
    epochs = {p.key: registry.recipe_for(p.spec, config.recipes).epochs for p in plans}
    cost = {p.key: TRAIN_IMAGES / IMAGES_PER_S[p.spec.name] + 3.0 for p in plans}  # per epoch, with validation
    events, waiting, free_at = [], list(plans), [clock.now] * slots
    for plan in waiting:  # the true timeline: each run on the slot that frees first
        slot = free_at.index(min(free_at))
        start = free_at[slot]
        ends = [start + START_UP_S + cost[plan.key] * (e + 1) for e in range(epochs[plan.key])]
        events.append(("start", start, plan.key, 0))
        events += [("epoch", end, plan.key, e + 1) for e, end in enumerate(ends)]
        events.append(("finish", ends[-1], plan.key, 0))
        free_at[slot] = ends[-1]
    finish = max(free_at)
    events.sort(key=lambda e: (e[1], e[0] != "finish"))
    began, samples = clock.now, []
    for kind, when, key, epoch in events:
        while clock.now + 2 <= when:
            clock.now += 2
            samples.append((clock.now - began, progress.seconds_left(), finish - clock.now))
        clock.now = when
        if kind == "start":
            progress.run_started(key)
        elif kind == "epoch":
            progress.epoch_reported(key, epoch, cost[key])
        else:
            progress.run_finished(key)
    return samples, progress


@pytest.mark.parametrize("slots", [1, 2])
def test_time_left_is_within_a_factor_two_after_the_first_minute(slots):
    samples, progress = simulate(slots)
    assert progress.runs_done == progress.runs == 9 and progress.seconds_left() == 0
    judged = [(t, estimate, truth) for t, estimate, truth in samples if t >= 60 and truth > 30]
    assert len(judged) >= 10
    for t, estimate, truth in judged:
        assert estimate is not None, t
        assert truth / 2 <= estimate <= 2 * truth, (t, estimate, truth)


def test_no_estimate_before_an_epoch_and_the_line_says_so():
    config = load_config(ROOT / "configs" / "demo.yaml", {"storage": "/tmp/unused-camstudy-store"})
    clock = Clock()
    progress = StageProgress(config, plan_runs(config, StudyStore(config.study_dir)), 2, clock=clock)
    assert progress.seconds_left() is None and "estimating" in progress.line()
    progress.run_started("resnet18-seed0")
    clock.now += 20
    progress.epoch_reported("resnet18-seed0", 1, 20.0)
    assert "0/9 runs done, ~" in progress.line()
