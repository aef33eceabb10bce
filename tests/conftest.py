"""Shared fixtures: keep this file small, tests own their helpers.

One in-process Ray per test session (`ray_session`), started by the first test that asks for it
and shut down once at the end: starting and stopping Ray several times in one interpreter while
Ray Data or Ray Train threads of the previous session are still winding down is the pattern Ray
documents as unsafe (ray-project/ray#31145: threads touching a freed core worker), and it is
what made `make test` die with SIGSEGV after a green summary. `pytest_unconfigure` closes what
tests leave open in this process (Ray, a torch.distributed group, MLflow's SQLAlchemy engines)
before the interpreter starts tearing itself down, and names any thread still running.

`make test` runs the suite in parallel processes (pytest-xdist, `--dist loadfile`: a file's tests,
and the module fixtures they share, stay in one process). So that two of them never share a Ray:
every Ray a test starts without naming a cluster is a local one of its own (RAY_ADDRESS=local,
below; `ray.init` and `camstudy` would otherwise join a cluster that `ray start --head` or
`ray.cluster_utils.Cluster` in another process left on this machine), and the whole-study
scenarios (tests/e2e/, minutes each) are handed out first, so the processes end together.
"""

import os
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository root; test files import it from here
SHARED_DATA = ROOT.parent / "shared" / "data"
TINY_SIZE = 32
TINY_SPLITS = {"train": 96, "val": 32, "test": 32}
BIG_MODELS = ("resnet101", "vit_base", "vgg16", "vgg19", "vit_large")  # 45-303 M parameters: 3-30 s a test here

# inherited by every `camstudy` a test starts; tests that join a cluster name it (test_multinode,
# test_ray_job) and tests of the joining itself set RAY_ADDRESS themselves
os.environ["RAY_ADDRESS"] = "local"


def pytest_collection_modifyitems(config, items):
    """Whole-study scenarios first: xdist hands out files in this order, and a long file taken last
    would leave one process working alone at the end."""
    items.sort(key=lambda item: Path(str(item.fspath)).parent.name != "e2e")  # stable: order kept otherwise


def by_size(names) -> list:
    """Model names as test parameters, the big models marked slow (`make test-fast` leaves them out)."""
    return [pytest.param(name, marks=pytest.mark.slow) if name in BIG_MODELS else name for name in names]


def make_tiny_cache(path, seed: int = 0, size: int = TINY_SIZE) -> None:
    """A preprocessing cache of size x size (32 by default) z-scored noise; positives carry a
    bright disc (the "lesion"), so a ResNet-18 from scratch separates the classes within three
    short epochs."""
    from training.cache import write_cache

    rng = np.random.default_rng(seed)
    split = np.concatenate([[name] * n for name, n in TINY_SPLITS.items()])
    labels = np.arange(len(split)) % 2
    images = rng.normal(0, 1, (len(split), size, size)).astype(np.float32)
    masks = np.zeros(images.shape, np.uint8)
    rows, cols = np.mgrid[:size, :size]
    for i in np.flatnonzero(labels):
        centre = rng.integers(size // 4, 3 * size // 4, 2)
        disc = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= (size / 6) ** 2
        images[i][disc] += 3.0
        masks[i][disc] = 1
    from training.lesions import lesion_covariates

    regions, elongation = zip(*(lesion_covariates(mask) for mask in masks))
    index = pd.DataFrame({"image_id": [f"img{i:03d}" for i in range(len(split))], "split": split,
                          "label": labels, "mask_fraction": masks.mean(axis=(1, 2)), "rle_rows": labels.astype(float),
                          "n_regions": regions, "elongation": elongation})
    write_cache(path, index, images, masks)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """In-process torch on one thread for the whole session. Tiny convolutions on two threads of a
    busy 2-core machine wait on OpenMP barriers: test_reliability's 3-epoch resnet18 at 64 px
    trained in 31 s on two threads and 13 s on one at load 4.5 (10 s and 5 s beside one busy
    process; 4 s and 6 s on an idle machine). A test that set one thread and never restored it
    had made the rest of `make test` single-threaded already, depending on the order."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """The tiny cache, built once per session (the training-loop and DDP tests share it)."""
    path = tmp_path_factory.mktemp("cache") / "cache"
    make_tiny_cache(path)
    return path


@pytest.fixture(scope="session")
def stage2_labels() -> Path:
    """The real SIIM-ACR stage-2 label file (12,954 rows), skipped where it is not checked out."""
    path = SHARED_DATA / "siim-acr-stage2-train-rle.csv.gz"
    if not path.is_file():
        pytest.skip(f"real label file {path} absent (it lives in the shared data folder)")
    return path


@pytest.fixture(scope="session")
def ray_session():
    """A local two-CPU Ray shared by every in-process test (see the module docstring)."""
    ray = pytest.importorskip("ray")
    from orchestrator.ray_setup import local_data_context

    if not ray.is_initialized():
        # address="local": always a Ray of its own; without it ray.init joins a cluster that `ray start --head`
        # left running on this machine (an e2e test of another suite run) and refuses num_cpus there
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    local_data_context(progress=False)
    yield ray
    # shut down in pytest_unconfigure, after every other session fixture has been torn down


def pytest_unconfigure(config):
    """Close this process's native resources while the interpreter is still whole."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _dispose_mlflow_engines()
    alive = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()]
    if alive:
        names = ", ".join(sorted(f"{t.name}{' (daemon)' if t.daemon else ''}" for t in alive))
        print(f"\nthreads still alive at the end of the session: {names}", file=sys.stderr)


def _dispose_mlflow_engines() -> None:
    """MLflow keeps one SQLAlchemy engine (and its connection pool) per database URI, for ever."""
    stores = sys.modules.get("mlflow.store.tracking.sqlalchemy_store")
    if stores is not None:
        for engine in stores.SqlAlchemyStore._engine_map.values():
            engine.dispose()
