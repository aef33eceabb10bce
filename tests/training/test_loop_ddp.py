"""DDP inside one training run: two gloo processes on the CPU without Ray, then two Ray Train workers.

The processes are started with `torch.multiprocessing.spawn`; each records, through small wrappers
installed in its own process only, the index shares it trained on and a hash of its weights after
every epoch, and writes them with what `train_run` returned to `<out>/rank<r>.json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from study.config import ModelsConfig, PreprocessConfig, ResourcesConfig, StudyConfig, TrainingConfig
from tests.conftest import ROOT, TINY_SIZE, TINY_SPLITS
from training import loop, registry
from study.errors import TrainingError
from study.recipes import Recipe

WORLD = 2
RECIPE = Recipe("adam", 1e-3, 2)
BATCH = 8
FINAL_FILES = ["done.json", "model.pt", "predictions.parquet", "test_metrics.json"]
pytestmark = pytest.mark.timeout(600)


def _config(workers: int = WORLD) -> StudyConfig:
    return StudyConfig(preprocess=PreprocessConfig(image_size=TINY_SIZE), models=ModelsConfig(init="random"),
                       training=TrainingConfig(batch_size=BATCH), resources=ResourcesConfig(workers_per_run=workers))


class Killed(Exception):
    pass


# --------------------------------------------------------------------------- inside each spawned rank


def _weights_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in loop._state_dict(model).items():  # parameters and buffers (BatchNorm statistics)
        digest.update(key.encode() + value.numpy().tobytes())
    return digest.hexdigest()


def _record(seen: dict) -> None:
    """Wrap the loop's shard and checkpoint steps in this process to record what the rank did."""
    shard, save = loop.Ranks.shard, loop.save_checkpoint

    def recording_shard(ranks, index):
        share = shard(ranks, index)
        seen["shares"].append(share.tolist())
        return share

    def recording_save(path, state, fingerprint, **options):
        seen["weights"].append(_weights_hash(state.model))
        save(path, state, fingerprint, **options)

    loop.Ranks.shard, loop.save_checkpoint = recording_shard, recording_save


def _rank_main(rank: int, port: int, cache: str, run_dir: str, out: str, kill_after: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    seen = {"shares": [], "weights": [], "reports": []}
    _record(seen)

    def report(epoch, metrics):
        seen["reports"].append({k: metrics[k] for k in ("epoch", "train_loss", "val_loss", "val_auc", "best_epoch")})
        if epoch == kill_after:
            raise Killed

    try:
        result = loop.train_run(registry.get("resnet18"), RECIPE, _config(), cache, run_dir, seed=0, report=report)
        seen["result"] = dataclasses.asdict(result)
    except Killed:
        seen["result"] = None
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))


# --------------------------------------------------------------------------- the parent side


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_ddp(cache: Path, run_dir: Path, out: Path, kill_after: int = 0) -> list[dict]:
    """Both ranks' records; kill_after=k stops every rank after epoch k's report, as a crash would."""
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank_main, args=(_free_port(), str(cache), str(run_dir), str(out), kill_after), nprocs=WORLD)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def uninterrupted(tiny_cache, tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    return _train_ddp(tiny_cache, base / "run", base / "out"), base / "run"


@pytest.mark.slow
def test_two_ranks_train_one_run_and_rank_0_writes_its_files(uninterrupted):
    ranks, run_dir = uninterrupted
    assert sorted(p.name for p in run_dir.iterdir()) == FINAL_FILES
    done = json.loads((run_dir / "done.json").read_text())
    assert [m["epoch"] for m in done["history"]] == [1, 2]
    assert len(pd.read_parquet(run_dir / "predictions.parquet")) == TINY_SPLITS["test"]
    for rank in ranks:  # both ranks return the run's summary
        assert rank["result"]["history"] == done["history"] and rank["result"]["resumed_from"] == 1
    assert ranks[0]["weights"] == ranks[1]["weights"], "the ranks ended an epoch with different weights"
    assert ranks[0]["weights"][0] != ranks[0]["weights"][1]
    assert ranks[0]["reports"] == ranks[1]["reports"], "the ranks reported (or selected) differently"


@pytest.mark.slow
def test_each_rank_trains_on_its_own_half_of_every_global_batch(uninterrupted):
    ranks, _ = uninterrupted
    batches = TINY_SPLITS["train"] // BATCH
    first_epoch = [rank["shares"][:batches] for rank in ranks]
    assert all(len(share) == BATCH // WORLD for shares in first_epoch for share in shares)
    seen = [set(index for share in shares for index in share) for shares in first_epoch]
    # one shared shuffle, split: two independent shuffles would overlap
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(TINY_SPLITS["train"]))
    assert ranks[0]["shares"][:batches] != ranks[0]["shares"][batches:], "the order was not reshuffled"


@pytest.mark.slow
def test_a_killed_ddp_run_resumes_exactly_and_refuses_another_worker_count(uninterrupted, tiny_cache, tmp_path):
    run_dir = tmp_path / "run"
    killed = _train_ddp(tiny_cache, run_dir, tmp_path / "killed", kill_after=1)
    assert [rank["result"] for rank in killed] == [None, None]
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "done.json").exists()

    alone = tmp_path / "alone"
    shutil.copytree(run_dir, alone)
    with pytest.raises(TrainingError, match=r"written by a run with 2 worker\(s\), this run has 1; set "
                                            r"resources\.workers_per_run: 2 to resume it"):
        loop.train_run(registry.get("resnet18"), RECIPE, _config(workers=1), tiny_cache, alone, seed=0)
    with pytest.raises(TrainingError, match=r"workers_per_run is 2 but this run has 1 process"):
        loop.train_run(registry.get("resnet18"), RECIPE, _config(), tiny_cache, alone, seed=0)

    resumed = _train_ddp(tiny_cache, run_dir, tmp_path / "resumed")
    assert [rank["result"]["resumed_from"] for rank in resumed] == [2, 2]
    assert [r["epoch"] for r in resumed[0]["reports"]] == [2]
    whole = uninterrupted[0][0]
    # on CPU the resumed run is the uninterrupted one: each rank got its own augmentation state back
    assert resumed[0]["weights"] == whole["weights"][1:]
    assert resumed[0]["result"]["test_metrics"] == whole["result"]["test_metrics"]


def test_the_worker_count_enters_the_fingerprint_only_above_one():
    spec = registry.get("resnet18")
    one, two = (loop.run_fingerprint(spec, RECIPE, _config(workers), 0) for workers in (1, 2))
    assert one != two
    assert one == loop.run_fingerprint(spec, RECIPE, StudyConfig(
        preprocess=PreprocessConfig(image_size=TINY_SIZE), models=ModelsConfig(init="random"),
        training=TrainingConfig(batch_size=BATCH)), 0)


# --------------------------------------------------------------------------- through Ray Train


@pytest.mark.slow
def test_two_ray_train_workers_train_one_run_and_log_every_epoch(ray_session, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from study.config import load_config
    from orchestrator.pipeline import open_study
    from orchestrator.stages import stage_prepare, stage_train

    config = load_config(ROOT / "configs" / "demo.yaml", {
        "storage": str(tmp_path / "store"), "models.names": ["resnet18"], "data.synthetic.n": 60,
        "data.synthetic.size": 64, "split.n_val": 16, "split.n_test": 16, "preprocess.image_size": 32,
        "recipes.resnet.epochs": 2, "training.batch_size": BATCH, "resources.workers_per_run": 2,
        "resources.cpus_per_worker": 1, "resources.prepare_actors": 0})
    with open_study(config, command="test") as (store, tracker):
        stage_prepare(config, store, tracker)
        stage_train(config, store, tracker)
    assert "1 run(s), up to 1 at once, 2 worker(s)" in capsys.readouterr().out
    run_dir = Path(config.study_dir) / "train" / "resnet18-seed0"
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(FINAL_FILES + ["attempt.json"])
    assert [m["epoch"] for m in json.loads((run_dir / "done.json").read_text())["history"]] == [1, 2]
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(config.study_dir) / 'mlflow.db'}")
    child, = client.search_runs([client.get_experiment_by_name("camstudy").experiment_id],
                                filter_string="tags.`camstudy.role` = 'child'")
    assert child.info.status == "FINISHED" and child.data.params["workers_per_run"] == "2"
    assert [p.step for p in client.get_metric_history(child.info.run_id, "train/loss")] == [1, 2]
    assert "test/auc" in child.data.metrics
