"""GPU shares, longest-first packing and the schedule simulator (orchestrator/schedule.py), the
train stage's use of them, and bench/schedule.py's table."""

import json
import subprocess
import sys

import pytest

from orchestrator import schedule
from orchestrator.schedule import Demand, Packer
from orchestrator.train_runs import Starts, record_gpu_memory, run_demands
from study.runs import Placement, plan_runs
from study.config import load_config
from study.store import StudyStore
from tests.conftest import ROOT


def test_shares_are_memory_quarters_and_big_or_long_runs_get_whole_gpus():
    assert schedule.gpu_share(3.0, 80, seconds=10, longest_seconds=100) == 0.25
    assert schedule.gpu_share(30.0, 80, seconds=10, longest_seconds=100) == 0.5
    assert schedule.gpu_share(41.0, 80, seconds=10, longest_seconds=100) == 1.0  # more than half: whole
    assert schedule.gpu_share(3.0, 80, seconds=100, longest_seconds=100) == 1.0  # the critical path: whole
    assert schedule.gpu_share(170.0, 80, seconds=10, longest_seconds=100) == 3.0  # more than a GPU holds
    # parameters x 16 bytes (Adam) + activations x batch x 4 bytes + the CUDA context
    assert schedule.estimated_memory_gb(100, 1e6, 32, "adam") == pytest.approx(1.6 + 0.128 + 1.5)


def test_packer_is_best_fit_and_whole_gpus_need_idle_ones():
    packer = Packer(2)
    assert packer.place(Demand("a", 0.5, 1)) == [0]
    assert packer.place(Demand("b", 0.25, 1)) == [0]  # the fuller GPU it fits on
    assert packer.place(Demand("c", 1.0, 1)) == [1]
    assert packer.place(Demand("d", 0.5, 1)) is None  # 0.25 left on GPU 0, GPU 1 taken whole
    packer.release("a")
    assert packer.place(Demand("d", 0.5, 1)) == [0] and packer.free == [0.25, 0.0]


def test_simulation_of_a_known_schedule():
    runs = [Demand("long", 1.0, 10), Demand("half1", 0.5, 6), Demand("half2", 0.5, 6), Demand("q1", 0.25, 4),
            Demand("q2", 0.25, 4)]
    # 2 GPUs, longest first: long on GPU 0; half1 and half2 fill GPU 1; q1, q2 wait until t=6,
    # then share GPU 1 until t=10: makespan 10 = the longest run, the bound
    assert schedule.simulate(runs, 2) == 10
    assert schedule.lower_bound(runs, 2) == max(10, (10 + 3 + 3 + 1 + 1) / 2)
    assert schedule.simulate(runs, 1) == 10 + 6 + 4  # one GPU: long, then both halves, then both quarters
    with pytest.raises(ValueError, match="more GPUs"):
        schedule.simulate([Demand("x", 3.0, 1)], 2)


def paper(tmp_path, **overrides):
    config = load_config(ROOT / "configs" / "paper.yaml", {"storage": str(tmp_path), **overrides})
    store = StudyStore(config.study_dir)
    return config, store, plan_runs(config, store)


def test_the_train_stage_asks_for_shares_and_starts_longest_first(tmp_path):
    config, store, plans = paper(tmp_path, **{"training.seeds": [0]})
    demands = run_demands(config, store, plans)
    assert demands["vit_large-seed0"].gpus == 1.0  # the longest run: a whole GPU
    assert demands["resnet18-seed0"].gpus == 0.25
    starts = Starts(config, store, plans, Placement(packing=True, cluster_gpus=2, workers=1, concurrency=0, gpus=1,
                                                    torch_threads=1, resources={"CPU": 1.0, "GPU": 1}, on_gpu=True))
    first = starts.now(0)
    assert first[0][0].key == "vit_large-seed0" and first[0][1].resources["GPU"] == 1.0
    assert sum(placement.resources["GPU"] for _, placement in first) <= 2.0
    assert len(first) == 5  # ViT-L whole, four quarter-GPU runs on the other GPU
    waiting = {plan.key for plan in starts.pending}
    starts.finished(first[1][0])
    assert [plan.key for plan, _ in starts.now(len(first) - 1)][0] in waiting


def test_a_measured_peak_replaces_the_estimate(tmp_path):
    config, store, plans = paper(tmp_path, **{"training.seeds": [0]})
    resnet = next(plan for plan in plans if plan.key == "resnet18-seed0")
    store.root.mkdir(parents=True)
    resnet.run_dir.mkdir(parents=True)
    (resnet.run_dir / StudyStore.DONE).write_text(json.dumps({"gpu_peak_gb": 30.0}))
    record_gpu_memory(config, store, resnet)
    assert json.loads(store.gpu_memory_path.read_text()) == {"resnet18|batch32|224px|amp1|workers1": 30.0}
    assert run_demands(config, store, plans)["resnet18-seed0"].gpus == 0.5  # 30 GB x 1.2 of 80 GB
    overridden = load_config(ROOT / "configs" / "paper.yaml", {"storage": str(tmp_path),
                                                               "resources.model_resources": {"resnet18": {"GPU": 2}}})
    assert run_demands(overridden, store, plans)["resnet18-seed0"].gpus == 2.0


@pytest.mark.slow  # bench/schedule.py over the paper's runs
def test_the_simulator_prints_its_table_ending_with_the_ratio():
    done = subprocess.run([sys.executable, "bench/schedule.py", "--config", "configs/paper.yaml", "--gpus", "8",
                           "--seeds", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 + 8 + 1 and lines[-1].split()[:2] == ["3", "8"]
    ratio = float(lines[-1].split()[-1])
    assert 1.0 <= ratio <= 1.15
