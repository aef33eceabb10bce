"""One training run (model x seed) in plain PyTorch: no Ray here, so it runs in a unit test.

`train_run` fine-tunes one registry model on the preprocessed cache, held in memory on the
training device (0.54 GB at paper scale), with batched on-device augmentation, and after every
epoch writes a checkpoint and calls `report(epoch, metrics)`; a Ray Train worker passes a
callback that calls `ray.train.report`. The run directory afterwards holds:

    checkpoint.pt          model + optimizer + RNG states + history, after every epoch (the last
                           epoch's has no optimizer state: nothing follows it); removed at the end
    best-eNNNN.pt          the checkpoint of the selected epoch so far, a hard link (no second
                           write), kept only while later epochs may replace checkpoint.pt
    model.pt               the selected weights, for the explain stage (`load_trained`)
    predictions.parquet    test split: image_id, label, probability (of the positive class)
    test_metrics.json      classification report with 95% CIs (Wilson, DeLong)
    done.json              written last: a rerun returns it without training

Calling `train_run` again after a crash resumes after the last finished epoch; generator states
are checkpointed too, so on CPU the resumed run equals an uninterrupted one.

Inside a torch.distributed group of k > 1 processes (Ray Train's `TorchTrainer` with
`resources.workers_per_run: k`) the run is data-parallel: the model is wrapped in
DistributedDataParallel, every rank draws the same shuffled order and trains on its interleaved
k-th of each global batch of `training.batch_size` images with its own augmentation draws, the
reported train loss is the mean over all ranks, and every rank validates on the whole split (so
all select the same epoch). Rank 0 alone writes files; the others wait at a barrier after each
epoch and at the end. Run and cache folders must be shared by all ranks' machines.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from study import objectstore
from study.atomic import link_atomic, write_atomic, write_text_atomic
from study.errors import TrainingError
from study.recipes import Recipe
from study.records import FILES, run_inputs, vouched_files
from study.records import fingerprint as inputs_fingerprint
from study.runs import finished_run
from study.store import StudyStore
from training import augment, registry
from training.cache import load_split
from training.classification import auc, classification_report
from training.registry import ModelSpec

CHECKPOINT, MODEL, DONE = StudyStore.CHECKPOINT, StudyStore.MODEL, StudyStore.DONE
PREDICTIONS, TEST_METRICS = StudyStore.PREDICTIONS, StudyStore.TEST_METRICS
Report = Callable[[int, dict], None]


@dataclass(frozen=True)
class RunResult:
    model: str
    seed: int
    run_dir: str
    epochs: int
    best_epoch: int
    history: list[dict]
    test_metrics: dict
    weights: str  # where the starting weights came from
    parameters: int
    resumed_from: int  # first epoch this call trained (1 = fresh start)
    skipped: bool = False  # done.json existed: nothing was trained


@dataclass
class Split:
    """One cache split on the training device."""

    image_ids: list[str]
    images: torch.Tensor  # float16 (N, 1, S, S)
    labels: torch.Tensor  # int64 (N,)


@dataclass(frozen=True)
class Ranks:
    """This process's place in a DDP group: rank 0 of 1 when it trains alone."""

    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def writes(self) -> bool:
        return self.rank == 0

    def shard(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's interleaved share of a global batch."""
        return index[self.rank::self.world] if self.distributed else index

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """`value` from every rank, in rank order."""
        if not self.distributed:
            return [value]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered


def current_ranks() -> Ranks:
    """The torch.distributed group this process belongs to (Ray Train initialises it), if any."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


@dataclass
class RunState:
    """Everything a checkpoint restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    shuffle: torch.Generator  # CPU: batch order
    augment: torch.Generator  # on the device: augmentation draws
    weights: str
    epoch: int = 0  # finished epochs
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = -math.inf
    ranks: Ranks = field(default_factory=Ranks)


def train_run(spec: ModelSpec, recipe: Recipe, config: Any, cache_dir: str | Path, run_dir: str | Path,
              seed: int, report: Optional[Report] = None, device: Optional[str | torch.device] = None,
              fingerprint: Optional[str] = None, permuted_labels: bool = False) -> RunResult:
    """Train `spec` with `recipe` under the study `config`; resume or skip from what `run_dir` holds.

    `fingerprint` identifies the settings (default: `run_fingerprint`); a checkpoint or done.json
    with another fingerprint is refused, never silently reused. `permuted_labels`: the data
    randomisation test (docs/STUDY.md §10): the training split's labels are permuted with `seed`
    (validation and test keep theirs, so model selection and the test metrics stay honest).
    """
    run_dir = Path(run_dir)
    inputs = run_inputs(spec, recipe, config, seed, permuted_labels)
    fingerprint = fingerprint or inputs_fingerprint(inputs)
    done = finished_run(run_dir, fingerprint, inputs)
    if done is not None:
        return _result(done, resumed_from=recipe.epochs + 1, skipped=True)
    ranks = current_ranks()
    _check_world(ranks, config)
    device = _device(device, ranks)
    if device.type == "cuda":  # fixed input size: autotuned convolutions, +15-55% on an H100
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(seed)  # model init (random head) and dropout
    data = {name: load_device_split(cache_dir, name, device) for name in ("train", "val", "test")}
    if permuted_labels:
        data["train"] = permute_labels(data["train"], seed)
    state = _start(spec, recipe, config, run_dir, seed, device, fingerprint, ranks)
    resumed_from = state.epoch + 1
    for epoch in range(resumed_from, recipe.epochs + 1):
        metrics = run_epoch(state, data, spec, config, epoch, seed, device)
        _select(state, metrics, config.training.selection)
        save_checkpoint(run_dir / CHECKPOINT, state, fingerprint, optimizer=epoch < recipe.epochs)
        _keep_best(run_dir, state, recipe, config.training.selection)
        ranks.barrier()  # no rank starts the next epoch (or may be killed) before the checkpoint exists
        if report is not None:
            report(epoch, metrics)  # every rank: Ray Train waits for a report from each worker
    summary = _finish(state, data, spec, config, run_dir, seed, device, fingerprint, inputs) if ranks.writes else None
    ranks.barrier()  # done.json is written
    summary = summary or finished_run(run_dir, fingerprint, inputs)
    return _result(summary, resumed_from=resumed_from)


# --------------------------------------------------------------------------- building blocks


def _check_world(ranks: Ranks, config: Any) -> None:
    """The fingerprint counts workers from the config, so the config must match the group."""
    if ranks.world != config.resources.workers_per_run:
        raise TrainingError(f"resources.workers_per_run is {config.resources.workers_per_run} but this run has "
                            f"{ranks.world} process(es) in its torch.distributed group; start it through "
                            f"`camstudy train` (Ray Train starts one process per worker) or fix the config")


def _device(requested: Optional[str | torch.device], ranks: Ranks) -> torch.device:
    """The requested device, else CUDA when present; under DDP each rank needs its own GPU index."""
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and ranks.distributed:
        if device.index is None:  # torchrun-style: LOCAL_RANK; Ray Train passes get_device() instead
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        torch.cuda.set_device(device)  # NCCL collectives (all_gather_object) use the current device
    return device


def wrap_ddp(model: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """DDP across the group (it broadcasts rank 0's weights now and averages gradients in backward)."""
    if not ranks.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def make_model(spec: ModelSpec, config: Any, device: torch.device, *, pretrained: bool = True) -> nn.Module:
    """The registry model on `device`; `pretrained=False` skips weight loading (a checkpoint follows)."""
    init = config.models.init if pretrained else "random"
    weights_file = config.models.weights_files.get(spec.name) if init == "imagenet" else None
    model = registry.build_model(spec, init=init, image_size=config.preprocess.image_size,
                                 weights_file=weights_file, in_chans=config.preprocess.channels)
    model = model.to(device)
    if _channels_last(spec, config, device):
        model = model.to(memory_format=torch.channels_last)
    return model


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimiser, fused (one kernel for all parameters: 3-5x faster steps on CPU too)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    common = {"lr": recipe.lr, "weight_decay": recipe.weight_decay, "fused": True}
    if recipe.optimizer == "adam":
        return torch.optim.Adam(parameters, **common)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(parameters, **common)
    return torch.optim.SGD(parameters, momentum=recipe.momentum, **common)


def permute_labels(split: Split, seed: int) -> Split:
    """The split with its labels shuffled among its images (a fixed permutation per seed)."""
    order = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(seed))
    return Split(split.image_ids, split.images, split.labels[order.to(split.labels.device)])


def load_device_split(cache_dir: str | Path, split: str, device: torch.device) -> Split:
    cached = load_split(cache_dir, split)
    return Split(cached.image_ids, cached.images.to(device), cached.labels.to(device))


def batch_indices(n: int, batch_size: int, generator: Optional[torch.Generator] = None,
                  drop_last: bool = False) -> list[torch.Tensor]:
    """Index batches; shuffled when a generator is given. drop_last keeps BatchNorm off 1-image batches."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    return list(order[:stop].split(batch_size))


def prepare_input(images: torch.Tensor, channels: int, channels_last: bool) -> torch.Tensor:
    """float16 (B, 1, S, S) -> float32 (B, channels, S, S); grey is replicated, not copied per pixel."""
    x = images.float().expand(-1, channels, -1, -1)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def train_epoch(state: RunState, split: Split, config: Any, channels_last: bool,
                device: torch.device) -> tuple[float, int]:
    """One pass over the shuffled training split: (mean loss, images seen); one device sync, at the end."""
    state.model.train()
    total, count = torch.zeros((), device=device), 0
    # every rank draws the same global order from the same generator and takes its share of each batch
    for index in batch_indices(len(split.labels), config.training.batch_size, state.shuffle, drop_last=True):
        index = state.ranks.shard(index).to(device)
        images = augment.augment(split.images[index].float(), config.augment, state.augment)
        x = prepare_input(images, config.preprocess.channels, channels_last)
        with _autocast(config, device):
            loss = F.cross_entropy(state.model(x).float(), split.labels[index])
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        total += loss.detach() * len(index)
        count += len(index)
    if state.ranks.distributed:
        _broadcast_buffers(state.model)
        return _global_mean(total, count)
    return (total / count).item(), count


def _broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's BatchNorm running statistics to every rank: each rank's last forward updated its own
    from its own images (DDP syncs buffers only before a forward), and all must validate one model."""
    for buffer in _unwrap(model).buffers():
        dist.broadcast(buffer, src=0)


def _global_mean(total: torch.Tensor, count: int) -> tuple[float, int]:
    """(mean loss, images) over every rank, so the reported loss does not depend on the rank."""
    summed = torch.stack([total, total.new_tensor(float(count))])
    dist.all_reduce(summed)
    return (summed[0] / summed[1]).item(), int(summed[1].item())


def evaluate(model: nn.Module, split: Split, config: Any, channels_last: bool,
             device: torch.device) -> tuple[float, np.ndarray]:
    """(mean cross-entropy, positive-class probabilities) over a split, in order."""
    model.eval()
    losses, probabilities = [], []
    with torch.inference_mode():
        for index in batch_indices(len(split.labels), config.training.batch_size):
            index = index.to(device)
            x = prepare_input(split.images[index], config.preprocess.channels, channels_last)
            with _autocast(config, device):
                logits = model(x).float()
            losses.append(F.cross_entropy(logits, split.labels[index], reduction="sum"))
            probabilities.append(torch.softmax(logits, dim=1)[:, 1])
    loss = (torch.stack(losses).sum() / len(split.labels)).item()
    return loss, torch.cat(probabilities).cpu().numpy().astype(np.float64)


def run_epoch(state: RunState, data: dict[str, Split], spec: ModelSpec, config: Any, epoch: int,
              seed: int, device: torch.device) -> dict:
    """Train one epoch and validate; the epoch's metrics (also appended to the history)."""
    channels_last = _channels_last(spec, config, device)
    start = time.perf_counter()
    train_loss, trained = train_epoch(state, data["train"], config, channels_last, device)
    seconds = time.perf_counter() - start
    _check_finite(train_loss, "training", spec, seed, epoch)
    # the bare module: a DDP forward would sync buffers, and every rank validates the whole split
    val_loss, probabilities = evaluate(_unwrap(state.model), data["val"], config, channels_last, device)
    _check_finite(val_loss, "validation", spec, seed, epoch)
    labels = data["val"].labels.cpu().numpy()
    metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_auc": auc(labels, probabilities),
               "val_accuracy": float(np.mean((probabilities >= config.training.threshold) == labels)),
               "lr": state.optimizer.param_groups[0]["lr"], "epoch_seconds": seconds,
               "train_images_per_s": trained / seconds}
    state.history.append(metrics)
    state.epoch = epoch
    return metrics


def _check_finite(loss: float, phase: str, spec: ModelSpec, seed: int, epoch: int) -> None:
    if not math.isfinite(loss):
        raise TrainingError(f"{spec.name} seed {seed}: the {phase} loss is {loss} in epoch {epoch}; the run "
                            f"diverged. Lower recipes.{spec.family}.lr or check the cache for bad images")


def _select(state: RunState, metrics: dict, selection: str) -> None:
    """Track the epoch chosen by `training.selection` (`_keep_best` keeps its weights)."""
    score = {"val_auc": metrics["val_auc"], "val_loss": -metrics["val_loss"], "last": metrics["epoch"]}[selection]
    if math.isnan(score):  # finite losses leave only one cause: a validation split of one class
        raise TrainingError(f"training.selection {selection}: the validation AUC is undefined (the validation "
                            f"split holds one class); rebuild the split or select by val_loss")
    if score > state.best_score:
        state.best_epoch, state.best_score = metrics["epoch"], score
    metrics["best_epoch"] = state.best_epoch


def _keep_best(run_dir: Path, state: RunState, recipe: Recipe, selection: str) -> None:
    """After the epoch's checkpoint: link it as best-eNNNN.pt if its epoch is the selected one and
    a later epoch could still overwrite checkpoint.pt; drop best files no longer needed. Also
    called on resume, which repairs a crash between the checkpoint and its link."""
    if not state.ranks.writes:
        return
    keep = _best_path(run_dir, state.best_epoch)
    if state.best_epoch == state.epoch:  # the checkpoint just written holds the selected weights
        if state.epoch < recipe.epochs and selection != "last":
            link_atomic(run_dir / CHECKPOINT, keep)
        else:
            keep = None  # no later epoch will replace that checkpoint
    # earlier bests, crashed epochs, or no longer needed
    objectstore.remove(stale for stale in run_dir.glob(StudyStore.BEST_CHECKPOINTS) if stale != keep)


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, state: RunState, fingerprint: str, optimizer: bool = True) -> None:
    """Called on every rank (the RNG states are gathered); rank 0 writes. `optimizer=False` leaves
    the optimizer state out (the last epoch's checkpoint: a resume only tests and writes)."""
    rng = _rng_states(state)
    if not state.ranks.writes:
        return
    checkpoint = {
        "fingerprint": fingerprint, "epoch": state.epoch, "history": state.history, "weights": state.weights,
        "best_epoch": state.best_epoch, "best_score": state.best_score, "world_size": state.ranks.world,
        "model": _state_dict(state.model), "rng": rng,
        **({"optimizer": state.optimizer.state_dict()} if optimizer else {}),
    }
    write_atomic(path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(path: Path, state: RunState, fingerprint: str) -> None:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    written_by = checkpoint.get("world_size", 1)
    if written_by != state.ranks.world:  # before the fingerprint, which differs too: say what differs
        raise TrainingError(f"{path}: the checkpoint was written by a run with {written_by} worker(s), this run has "
                            f"{state.ranks.world}; set resources.workers_per_run: {written_by} to resume it, or "
                            f"delete {path.parent} (or rerun the stage with --force) to start over")
    if checkpoint["fingerprint"] != fingerprint:
        raise TrainingError(f"{path}: the checkpoint was written with other settings (model, recipe, seed, "
                            f"data or training config); delete {path.parent} or rerun the stage with --force")
    _unwrap(state.model).load_state_dict(checkpoint["model"])
    if "optimizer" in checkpoint:  # absent after the last epoch, when no step follows
        state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.epoch, state.history, state.weights = checkpoint["epoch"], checkpoint["history"], checkpoint["weights"]
    state.best_epoch, state.best_score = checkpoint["best_epoch"], checkpoint["best_score"]
    _set_rng_states(state, checkpoint["rng"])


def _rng_states(state: RunState) -> dict:
    """Generator states. The torch and shuffle ones are the same on every rank; under DDP the
    augmentation and CUDA ones are lists in rank order (each rank draws its own, on its own GPU)."""
    shared = {"torch": torch.get_rng_state(), "shuffle": state.shuffle.get_state()}
    if not state.ranks.distributed:
        return {**shared, "augment": state.augment.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    own = (state.augment.get_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
    gathered = state.ranks.gather(own)  # a collective: every rank calls save_checkpoint
    return {**shared, "augment": [augment for augment, _ in gathered], "cuda": [cuda for _, cuda in gathered]}


def _set_rng_states(state: RunState, rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    state.shuffle.set_state(rng["shuffle"])
    if not state.ranks.distributed:
        state.augment.set_state(rng["augment"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return
    state.augment.set_state(rng["augment"][state.ranks.rank])
    cuda = rng["cuda"][state.ranks.rank]
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)  # the current device: this rank's GPU


def _start(spec: ModelSpec, recipe: Recipe, config: Any, run_dir: Path, seed: int, device: torch.device,
           fingerprint: str, ranks: Ranks = Ranks()) -> RunState:
    """A fresh run state, or the one the run directory's checkpoint holds; DDP-wrapped in a group."""
    resume = (run_dir / CHECKPOINT).is_file()
    model = make_model(spec, config, device, pretrained=not resume)
    shuffle_seed, augment_seed = np.random.SeedSequence(seed).generate_state(2)
    if ranks.distributed:  # ranks agree on the batch order but draw different augmentations
        augment_seed = np.random.SeedSequence([seed, ranks.rank]).generate_state(1)[0]
    state = RunState(model, make_optimizer(model, recipe),
                     torch.Generator().manual_seed(int(shuffle_seed)),
                     torch.Generator(device=device).manual_seed(int(augment_seed)),
                     weights=model.camstudy_weights.source, ranks=ranks)
    if resume:  # every rank loads before wrapping, so DDP's broadcast of rank 0's weights changes nothing
        load_checkpoint(run_dir / CHECKPOINT, state, fingerprint)
        _keep_best(run_dir, state, recipe, config.training.selection)
    # the optimizer holds the same Parameter objects, so wrapping after creating it is fine
    state.model = wrap_ddp(model, ranks, device)
    return state


def _best_path(run_dir: Path, epoch: int) -> Path:
    return run_dir / StudyStore.BEST_CHECKPOINT.format(epoch=epoch)


# --------------------------------------------------------------------------- the end of a run


def _finish(state: RunState, data: dict[str, Split], spec: ModelSpec, config: Any, run_dir: Path, seed: int,
            device: torch.device, fingerprint: str, inputs: dict) -> dict:
    """Test the selected weights, write the run's outputs, done.json last, then drop checkpoints."""
    if state.best_epoch != state.epoch:
        _unwrap(state.model).load_state_dict(_read_best(run_dir, state.best_epoch))
    _, probabilities = evaluate(_unwrap(state.model), data["test"], config, _channels_last(spec, config, device),
                                device)
    labels = data["test"].labels.cpu().numpy()
    _write_predictions(run_dir / PREDICTIONS, data["test"].image_ids, labels, probabilities)
    metrics = {"model": spec.name, "seed": seed, "best_epoch": state.best_epoch,
               "selection": config.training.selection, **classification_report(labels, probabilities,
                                                                               config.training.threshold)}
    write_text_atomic(run_dir / TEST_METRICS, _dumps(metrics))
    _save_model(run_dir / MODEL, state, spec, config, fingerprint)
    summary = {"model": spec.name, "seed": seed, "run_dir": str(run_dir), "epochs": state.epoch,
               "best_epoch": state.best_epoch, "history": state.history, "test_metrics": metrics,
               "weights": state.weights, "parameters": registry.parameter_count(state.model),
               "node": this_node(), "gpu_peak_gb": _gpu_peak_gb(device), "host_peak_gb": _host_peak_gb(),
               "fingerprint": fingerprint, "inputs": inputs,
               # what explain and analyze read (not the checkpoints: they are removed just below)
               FILES: vouched_files(run_dir / DONE, [run_dir / PREDICTIONS, run_dir / TEST_METRICS, run_dir / MODEL],
                                    own_folder=False)}
    write_text_atomic(run_dir / DONE, _dumps(summary))
    objectstore.remove([run_dir / CHECKPOINT, *run_dir.glob(StudyStore.BEST_CHECKPOINTS)])
    return summary


def this_node() -> dict[str, Any]:
    """Where this process runs: the host, and the Ray node when it runs inside Ray."""
    import socket

    node: dict[str, Any] = {"host": socket.gethostname(), "ray_node_id": None}
    try:
        import ray

        if ray.is_initialized():
            node["ray_node_id"] = ray.get_runtime_context().get_node_id()
    except ImportError:  # the loop runs without Ray too
        pass
    return node


def _gpu_peak_gb(device: torch.device) -> Optional[float]:
    """Peak memory this process allocated on its GPU (what the scheduler's share is corrected by)."""
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def _host_peak_gb() -> float:
    """Peak resident memory of this process (a Ray Train worker lives for one run): what the
    scheduler's host-memory reservation is corrected by. Linux reports ru_maxrss in KiB, macOS in bytes."""
    import resource
    import sys

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9


def _read_best(run_dir: Path, epoch: int) -> dict[str, torch.Tensor]:
    """The selected epoch's weights from its best file (mmap: the optimizer state is never read)."""
    best = torch.load(_best_path(run_dir, epoch), map_location="cpu", weights_only=True, mmap=True)
    return best["model"] if "fingerprint" in best else best  # older runs wrote a bare state_dict


def _write_predictions(path: Path, image_ids: list[str], labels: np.ndarray, probabilities: np.ndarray) -> None:
    table = pd.DataFrame({"image_id": image_ids, "label": labels.astype(np.int64), "probability": probabilities})
    write_atomic(path, lambda tmp: table.to_parquet(tmp, index=False))


def _save_model(path: Path, state: RunState, spec: ModelSpec, config: Any, fingerprint: str) -> None:
    payload = {"model": _state_dict(state.model), "spec": dataclasses.asdict(spec), "epoch": state.best_epoch,
               "image_size": config.preprocess.image_size, "in_chans": config.preprocess.channels,
               "num_classes": 2, "fingerprint": fingerprint}
    write_atomic(path, lambda tmp: torch.save(payload, tmp))


def load_trained(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelSpec]:
    """The selected model of a finished run (in eval mode) and its spec, for the explain stage."""
    payload = _read_model_file(run_dir)
    return _model_from(payload, run_dir).to(device).eval(), ModelSpec(**payload["spec"])


def load_trained_model(spec: ModelSpec, config: Any, run_dir: str | Path) -> nn.Module:
    """`load_trained` for a known spec and study config: refuses a model.pt of another model or size."""
    payload = _read_model_file(run_dir)
    saved = (payload["spec"]["name"], payload["image_size"], payload["in_chans"])
    wanted = (spec.name, config.preprocess.image_size, config.preprocess.channels)
    if saved != wanted:
        raise TrainingError(f"{Path(run_dir) / MODEL} holds (model, image size, channels) {saved}, not {wanted}; "
                            f"rerun the train stage with --force")
    return _model_from(payload, run_dir).eval()


def _read_model_file(run_dir: str | Path) -> dict:
    path = Path(run_dir) / MODEL
    if not path.is_file():
        raise TrainingError(f"{path}: no trained model; run `camstudy train CONFIG` first")
    return torch.load(path, map_location="cpu", weights_only=True)


def _model_from(payload: dict, run_dir: str | Path) -> nn.Module:
    spec = ModelSpec(**payload["spec"])
    model = registry.build_model(spec, init="random", image_size=payload["image_size"],
                                 num_classes=payload["num_classes"], in_chans=payload["in_chans"])
    model.load_state_dict(payload["model"])
    model.camstudy_weights = dataclasses.replace(model.camstudy_weights, source=f"trained:{run_dir}")
    return model


def run_fingerprint(spec: ModelSpec, recipe: Recipe, config: Any, seed: int) -> str:
    """A hash of everything that changes what a run computes; a checkpoint from other settings is refused."""
    return inputs_fingerprint(run_inputs(spec, recipe, config, seed))




# --------------------------------------------------------------------------- small helpers


def _channels_last(spec: ModelSpec, config: Any, device: torch.device) -> bool:
    """CNNs on CUDA and CPU (cuDNN's and oneDNN's NHWC kernels; a CPU training step of resnet18/50
    at 96 px, 1 thread, took 13-16% less time than NCHW); ViTs have no convolution trunk."""
    return config.training.channels_last and device.type in ("cuda", "cpu") and not spec.token_reshape


def _autocast(config: Any, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.training.amp and device.type == "cuda")


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu() for key, value in _unwrap(model).state_dict().items()}


def _dumps(value: dict) -> str:
    """JSON with nan/inf written as null (strict JSON readers reject NaN)."""
    def clean(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: clean(v) for key, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(v) for v in item]
        return item
    return json.dumps(clean(value), indent=2)


def _result(summary: dict, resumed_from: int, skipped: bool = False) -> RunResult:
    keys = ("model", "seed", "run_dir", "epochs", "best_epoch", "history", "test_metrics", "weights", "parameters")
    return RunResult(**{key: summary[key] for key in keys}, resumed_from=resumed_from, skipped=skipped)
