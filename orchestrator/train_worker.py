"""What runs inside Ray Train's processes: the worker's loop and the controller's callback.

Kept apart from `orchestrator.train_runs` on purpose: Ray imports the module of every function
and class it unpickles, and that module imports timm, torch and MLflow (~10 CPU-seconds on a
small machine). The Train controller needs none of them, and the worker imports the training
code itself, inside the function; each run starts a new controller and new workers.
"""

from __future__ import annotations

import json

import ray.train
from ray.util.queue import Queue


class EpochReporter(ray.train.UserCallback):
    """Runs on the Train controller: forwards rank 0's report of each epoch to the driver, which
    logs it to the run's MLflow child and prints a progress line. Neither the workers nor the
    controller touch tracking (or import MLflow: 3 CPU-seconds per run on a small machine)."""

    def __init__(self, run_key: str, progress: Queue):
        self.run_key, self.progress = run_key, progress

    def after_report(self, run_context, metrics, checkpoint):
        self.progress.put((self.run_key, metrics[0]))  # rank 0 speaks for the run; DDP ranks agree


def train_worker(loop_config: dict) -> None:
    """Body of every Ray Train worker: the plain-PyTorch loop, reporting through Ray.

    camstudy's own error (a diverged loss, a missing weights file: a CamstudyError) is written to
    the run's error.json by rank 0 and the worker returns normally, so Ray Train does not retry
    what a retry cannot mend; the driver reads the file and reports it. Anything else is a crash
    and propagates: Ray Train restarts the worker, which resumes from the last checkpoint."""
    import torch
    from ray.train.torch import get_device

    from study import objectstore
    from study.atomic import write_text_atomic
    from study.errors import CamstudyError
    from study.store import StudyStore
    from training import registry
    from training.loop import train_run

    torch.set_num_threads(loop_config["torch_threads"])
    config = loop_config["config"]
    # a worker may run on another node, whose store is its own (for a study in object storage,
    # that node's mirror, its uploads on): built here from the config, not sent from the driver
    store = StudyStore(config.study_dir)
    run_dir = store.run_dir(loop_config["model"], loop_config["seed"], loop_config.get("permuted", False))
    store.pull(store.cache_dir, run_dir)  # the cache staged once per node; a checkpoint to resume from
    rank0 = ray.train.get_context().get_world_rank() == 0
    if rank0:
        objectstore.remove([run_dir / StudyStore.ERROR])  # an earlier attempt's
    try:
        spec = registry.get_spec(config.models, loop_config["model"])
        train_run(spec, registry.recipe_for(spec, config.recipes), config, store.cache_dir,
                  run_dir, loop_config["seed"],
                  report=lambda epoch, metrics: ray.train.report({"epoch": epoch, **metrics}),
                  # Ray's pick of this worker's GPU (its index among the visible ones need not be LOCAL_RANK)
                  device=get_device(), fingerprint=loop_config["fingerprint"],
                  permuted_labels=loop_config.get("permuted", False))
    except CamstudyError as error:
        if rank0:
            write_text_atomic(run_dir / StudyStore.ERROR,
                              json.dumps({"kind": type(error).__name__, "message": str(error)}))
