"""Memory-aware placement: each training worker and explain actor asks Ray for the host memory it
needs (orchestrator/schedule.py's estimate or a measured peak), the driver never starts runs that
cannot fit together, a run too big for every node is refused in one line, and Ray's
memory-monitor kills are retried a bounded number of times and reported in one line."""

import dataclasses
import io
import json
import logging
import os
from contextlib import redirect_stdout

import pytest

from orchestrator import ray_setup, schedule, stages, train_runs
from orchestrator.train_runs import Outcome, Starts, host_memory_gb, record_host_memory
from study.runs import Placement, plan_runs
from training import registry
from study.config import load_config
from study.store import StudyStore
from study.errors import CamstudyError, TrainingError
from training.ray_data import TRACE_LOGGER
from tests.conftest import ROOT

GB = 1e9
# Peak resident memory (GB, ru_maxrss) of one process importing what a Train worker imports and
# taking two optimizer steps on the CPU, measured on the 2-core machine (torch 2.14, 1 thread):
# (model, image size, batch, optimizer) -> GB. The estimate must never be below these.
MEASURED_PEAKS = {
    ("resnet50", 96, 32, "adam"): 2.28, ("resnet101", 96, 32, "adam"): 2.83, ("vgg16", 96, 32, "adam"): 4.27,
    ("vit_small", 96, 32, "sgd"): 1.98, ("vit_base", 96, 32, "sgd"): 3.15, ("vit_large", 96, 32, "sgd"): 7.26,
    ("resnet18", 224, 32, "adam"): 2.34, ("resnet50", 224, 8, "adam"): 2.70, ("vgg16", 224, 8, "adam"): 4.42,
    ("vit_base", 224, 8, "sgd"): 3.67, ("vgg16", 96, 1, "adam"): 3.88, ("vit_large", 96, 1, "sgd"): 4.98,
}
# What Ray's memory monitor pushes to the driver when it kills a run's task (trimmed: the real
# report has ~45 lines, the object-store table and the top-10 memory users among them).
KILL_REPORT = """Task _fit failed due to oom. There are 1 oom retries remaining, so the task will be retried. Error: 2 worker(s) were killed due to the node running low on memory. Memory on the node (IP: 192.0.2.2, ID: ba4a43943787907915104b90) was 22.80GB used / 23.54GB limit (0.968600)
OOM kill reason: Memory usage 22800000000B exceeded threshold of 22360000000B (95.0% of 23540000000B limit)
Object store memory usage: [- objects spillable: 0
- bytes spillable: 0]
Ray killed 2 worker(s) based on the killing policy
Considered workers: [
Selected to kill: (Task: job ID=01000000, lease ID=00000000, task name=train[vit_large-seed0], required resources={}, pid=17049, actual memory used=0.11GB, worker ID=79e8d85e)
Selected to kill: (Actor(34f35bc7): job ID=01000000, lease ID=06000000, task name=RayTrainWorker.__init__, required resources={CPU_group_0: 1}, pid=17871, actual memory used=14.2GB, worker ID=32c1)
]
Top 10 memory users: PID	MEM(GB)	COMMAND
17871	14.20	ray::RayTrainWorker
Refer to the documentation on how to address the out of memory issue: https://docs.ray.io/en/latest/ray-observability/user-guides/debug-apps/debug-memory.html."""


def study(tmp_path, name="demo", cache_bytes=0, **overrides):
    config = load_config(ROOT / "configs" / f"{name}.yaml",
                         {"storage": str(tmp_path), "resources.model_resources": {}, **overrides})
    store = StudyStore(config.study_dir)
    if cache_bytes:
        store.cache_dir.mkdir(parents=True)
        with open(store.cache_dir / StudyStore.CACHE_IMAGES, "wb") as cache:
            cache.truncate(cache_bytes)  # sparse: only its size is read
    return config, store, plan_runs(config, store)


def cpu_placement(node_gb: float, concurrency: int = 2, nodes: int = 1) -> Placement:
    """placement()'s answer on CPU-only nodes of `node_gb` GB of Ray memory each."""
    return Placement(workers=1, gpus=0, concurrency=concurrency, packing=False, cluster_gpus=0, torch_threads=1,
                     resources={"CPU": 1.0}, on_gpu=False, nodes=({"CPU": 2.0, "memory": node_gb * GB},) * nodes)


def estimate(model: str, image_size: int, batch: int, optimizer: str, on_gpu: bool = False, cache_gb: float = 0.0):
    spec = registry.get_spec(load_config(ROOT / "configs" / "demo.yaml").models, model)
    _, activations = registry.forward_cost(spec, image_size, 3)
    params = registry.parameter_count_millions(spec, image_size, in_chans=3)
    return schedule.estimated_host_memory_gb(params, activations, batch, optimizer, cache_gb, on_gpu)


def test_the_host_estimate_covers_the_measured_peaks_and_grows_with_image_size_and_batch():
    for (model, size, batch, optimizer), peak in MEASURED_PEAKS.items():
        assert peak <= estimate(model, size, batch, optimizer) <= 1.5 * peak, (model, size, batch)
    for model in registry.specs_for(load_config(ROOT / "configs" / "demo.yaml").models):
        small, large = estimate(model.name, 96, 32, "adam"), estimate(model.name, 224, 32, "adam")
        assert schedule.HOST_PROCESS_GB < small < large < 40, model.name
        assert estimate(model.name, 224, 8, "adam") < large < estimate(model.name, 224, 64, "adam")
        assert estimate(model.name, 224, 32, "adam", cache_gb=0.5) == pytest.approx(large + 0.5)
        # on a GPU node the model trains on the device: the host keeps the weights and the CUDA libraries
        assert estimate(model.name, 224, 32, "adam", on_gpu=True) < large


def test_runs_that_cannot_fit_together_are_not_started_together(tmp_path):
    config, store, plans = study(tmp_path)
    starts = Starts(config, store, plans, cpu_placement(node_gb=10.0))
    need = {plan.key: host_memory_gb(plan, config, store, on_gpu=False) for plan in plans}
    in_flight, seen_together = [], set()
    while starts.pending or in_flight:
        in_flight += [plan.key for plan, _ in starts.now(len(in_flight))]
        assert in_flight, "nothing could start although nothing runs"
        assert sum(need[key] for key in in_flight) <= 10.0 and len(in_flight) <= 2
        seen_together.add(frozenset(in_flight))
        done = in_flight.pop(0)  # the oldest finishes first
        starts.finished(next(plan for plan in plans if plan.key == done))
    alone = {key for key in need if need[key] + min(need.values()) > 10.0}
    assert alone == {"vit_large-seed0"}  # 9.8 GB: it trains with nothing beside it on a 10 GB node
    assert not any("vit_large-seed0" in pair and len(pair) > 1 for pair in seen_together)
    assert any(len(pair) == 2 for pair in seen_together)  # the others still train two at a time


def test_the_demo_keeps_two_runs_at_a_time_on_this_machine(tmp_path):
    """Ray's `memory` on a 24 GB machine is what was free at start less the object store's 30%
    (~17.5 GB idle): every pair of demo runs fits, so reserving memory serialises nothing."""
    config, store, plans = study(tmp_path, cache_bytes=200 * 96 * 96 * 2)
    starts = Starts(config, store, plans, cpu_placement(node_gb=17.5))
    first = starts.now(0)
    assert [plan.key for plan, _ in first] == ["vit_large-seed0", "vgg19-seed0"]  # the two largest
    assert all(placement.resources["memory"] < 10 * GB for _, placement in first)


def test_a_run_larger_than_the_largest_node_is_refused_in_one_line(tmp_path):
    config, store, plans = study(tmp_path, "paper", cache_bytes=5338 * 224 * 224 * 2, **{"training.seeds": [0]})
    with pytest.raises(TrainingError) as refused:
        Starts(config, store, plans, cpu_placement(node_gb=17.5, nodes=2))
    message = str(refused.value)
    assert "\n" not in message and message.startswith("training vit_large needs ~26.")
    assert "17.5 GB" in message and "training.batch_size" in message and "vgg" not in message
    # GPU nodes not up yet (an autoscaler adds them): nothing to check against, Ray waits for them
    Starts(config, store, plans, dataclasses.replace(cpu_placement(node_gb=17.5), gpus=1, on_gpu=True, concurrency=27))


def test_a_measured_host_peak_replaces_the_estimate(tmp_path):
    config, store, plans = study(tmp_path, "paper", **{"training.seeds": [0]})
    resnet = next(plan for plan in plans if plan.key == "resnet18-seed0")
    resnet.run_dir.mkdir(parents=True)
    (resnet.run_dir / StudyStore.DONE).write_text(json.dumps({"gpu_peak_gb": None, "host_peak_gb": 2.5}))
    estimated = {on_gpu: host_memory_gb(resnet, config, store, on_gpu) for on_gpu in (False, True)}
    record_host_memory(config, store, resnet, on_gpu=False)
    assert json.loads(store.host_memory_path.read_text()) == {"resnet18|batch32|224px|amp1|workers1|cpu": 2.5}
    assert host_memory_gb(resnet, config, store, on_gpu=False) == pytest.approx(2.5 * schedule.HEADROOM)
    assert estimated[False] != pytest.approx(2.5 * schedule.HEADROOM)
    assert host_memory_gb(resnet, config, store, on_gpu=True) == estimated[True]  # a GPU node's peak is its own
    (resnet.run_dir / StudyStore.DONE).write_text(json.dumps({"host_peak_gb": 2.0}))
    record_host_memory(config, store, resnet, on_gpu=False)  # a lower peak keeps the higher one
    assert json.loads(store.host_memory_path.read_text())["resnet18|batch32|224px|amp1|workers1|cpu"] == 2.5


def test_the_ray_options_of_a_run_and_of_the_explain_actors_carry_memory(tmp_path, monkeypatch):
    config, store, plans = study(tmp_path, **{"faithfulness.enabled": False})
    placement = cpu_placement(node_gb=17.5)
    starts = Starts(config, store, plans, placement)
    for plan, run_placement in starts.now(0):
        asked = train_runs.scaling_config(config, plan, run_placement).resources_per_worker
        assert asked["memory"] == int(host_memory_gb(plan, config, store, False) * GB) and asked["CPU"] == 1.0

    # the explain stage hands explain.extract the per-actor memory (bytes) it passes to map_batches as memory=
    import explain.baselines
    import explain.extract

    called = {}
    monkeypatch.setattr(stages, "init_ray", lambda config: None)
    monkeypatch.setattr(stages, "await_released_resources", lambda stage: None)  # no Ray here
    monkeypatch.setattr(train_runs, "placement", lambda config: placement)
    monkeypatch.setattr(stages, "is_finished", lambda plan: True)
    monkeypatch.setattr(stages.ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(explain.baselines, "explain_baselines", lambda *args, **kwargs: None)
    monkeypatch.setattr(explain.extract, "extract_runs", lambda *args, **kwargs: called.update(kwargs))
    stages.stage_explain(config, store)
    largest = train_runs.explain_needs(config, store, plans, on_gpu=False)["vit_large"]
    assert 5.0 < largest < 6.0
    assert called["memory_per_actor"] == int(largest * GB) and called["actors"] == 2
    monkeypatch.setattr(train_runs, "placement", lambda config: cpu_placement(node_gb=8.0))
    stages.stage_explain(config, store)
    assert called["actors"] == 1  # two ViT-L actors do not fit in 8 GB: one
    monkeypatch.setattr(train_runs, "placement", lambda config: cpu_placement(node_gb=4.0))
    with pytest.raises(CamstudyError, match=r"^explain: an actor for vit_large needs ~5\.\d GB of host memory, more .* 4\.0 GB"):
        stages.stage_explain(config, store)

    # with ROAD, one ROAD actor's memory (ViT-L's weights while loading) is set aside first
    road_on = dataclasses.replace(config, faithfulness=dataclasses.replace(config.faithfulness, enabled=True))
    road_gb = train_runs.road_memory_gb(road_on, plans, on_gpu=False)
    assert road_gb == pytest.approx(schedule.HOST_PROCESS_GB + 304.3e6 * 4 * 2 / GB, abs=0.01)  # 3.7 GB
    assert train_runs.road_memory_gb(config, plans, on_gpu=False) == 0.0  # off: no ROAD actor
    monkeypatch.setattr(train_runs, "placement", lambda config: cpu_placement(node_gb=17.5))
    stages.stage_explain(road_on, store)  # 17.5 - 3.7 holds two CAM actors of 5.9
    assert (called["actors"], called["memory_per_actor"], called["road_memory_per_actor"]) == \
        (2, int(largest * GB), int(road_gb * GB))
    monkeypatch.setattr(train_runs, "placement", lambda config: cpu_placement(node_gb=12.0))
    stages.stage_explain(road_on, store)
    assert called["actors"] == 1  # two CAM actors fit in 12 GB, not beside the ROAD actor
    monkeypatch.setattr(train_runs, "placement", lambda config: cpu_placement(node_gb=8.0))
    with pytest.raises(CamstudyError, match=r"^explain: an actor for vit_large needs ~5\.\d GB of host memory beside "
                                            r"a ROAD actor's 3\.\d GB, .* 8\.0 GB .* turn faithfulness\.enabled off"):
        stages.stage_explain(road_on, store)


def test_a_memory_monitor_kill_is_one_console_line_naming_the_run(monkeypatch):
    line = ray_setup.memory_kill_line(KILL_REPORT)
    assert line == ("[ray] the memory monitor killed vit_large-seed0 (node 192.0.2.2 at 22.8 of 23.5 GB); "
                    "Ray retries it (1 left); the full report is in the study log")
    assert ray_setup.memory_kill_line("Task _fit failed: ValueError") is None

    # the driver's printer of raylet messages: the report goes to the study log, one line to the console
    import ray._private.worker as ray_worker

    printed = []
    monkeypatch.setattr(ray_worker, "print_to_stdstream", lambda data, *args, **kwargs: printed.append(data))
    ray_setup.route_memory_reports()
    ray_setup.route_memory_reports()  # once only
    trace, records = logging.getLogger(TRACE_LOGGER), []
    handler = logging.Handler()
    handler.emit = records.append
    trace.addHandler(handler)
    console = io.StringIO()
    try:
        with redirect_stdout(console):
            ray_worker.print_to_stdstream({"lines": [KILL_REPORT], "pid": "raylet", "is_err": False}, False)
            ray_worker.print_to_stdstream({"lines": ["infeasible task"], "pid": "raylet", "is_err": False}, False)
    finally:
        trace.removeHandler(handler)
    assert console.getvalue() == line + "\n"
    assert len(records) == 1 and "Top 10 memory users" in records[0].getMessage()
    assert printed == [{"lines": ["infeasible task"], "pid": "raylet", "is_err": False}]  # others pass unchanged

    # the run's own failure, once Ray gives up: one line naming the model and the remedy
    plan = plan_runs(load_config(ROOT / "configs" / "demo.yaml"), StudyStore("unused"))[0]
    monkeypatch.setattr(train_runs.ray, "get", lambda ref: Outcome("TrainingFailedError: " + KILL_REPORT))
    outcome = train_runs._outcome(plan, ref=None)
    assert "\n" not in outcome.error and outcome.error.startswith("killed by Ray's memory monitor (node 192.0.2.2 at 22.8")
    assert f"give {plan.spec.name} a node with more memory" in outcome.error


def test_ray_is_started_with_bounded_retries_of_memory_kills(monkeypatch):
    """Ray's default retries a task its memory monitor killed without limit; init_ray bounds it
    (RAY_task_oom_retries, read by the driver that owns the run tasks and by the processes it
    starts), keeping a value the user set."""
    import ray

    started = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: started.append(os.environ.get(ray_setup.OOM_RETRIES_ENV)))
    monkeypatch.setattr(ray_setup, "running_cluster", lambda: None)
    monkeypatch.setattr(ray_setup, "route_memory_reports", lambda: None)
    monkeypatch.setattr(ray_setup, "local_data_context", lambda progress: None)
    monkeypatch.delenv(ray_setup.OOM_RETRIES_ENV, raising=False)
    ray_setup.init_ray()
    monkeypatch.setenv(ray_setup.OOM_RETRIES_ENV, "3")
    ray_setup.init_ray()
    assert started == ["1", "3"]


@pytest.mark.slow  # starts the session's local Ray
def test_placement_reads_each_node_s_ray_memory(tmp_path, ray_session):
    config, store, plans = study(tmp_path)
    placement = train_runs.placement(config)
    assert placement.on_gpu is False and len(placement.nodes) == 1
    assert placement.nodes[0]["memory"] == pytest.approx(ray_session.cluster_resources()["memory"])
