"""How the train stage shares GPUs among runs: each run's GPU share, their order, and packing.

Ray places a task asking for a fraction of a GPU on one GPU with that much left; the driver
decides what each run asks for and when to submit it. Both decisions live here, torch- and
Ray-free, so `bench/schedule.py` can run exactly this code against a throughput table.

- **The share** (`gpu_share`): a run asks for the fraction of one GPU's memory it needs at the
  configured batch and image size, rounded up to a quarter, from an estimate (parameters and
  optimiser state, activations of one batch in bf16, the CUDA context) or, once a run of the
  same model and settings has trained on a GPU of this study, from its measured peak
  (`gpu_memory.json` in the store) with 20% headroom. A run needing more than half a GPU, and a
  run as long as the longest, gets whole GPUs: sharing would only stretch the critical path.
- **The order** (`longest_first`): the longest expected run first (list scheduling by longest
  processing time), so the last runs to start are short and no GPU waits on one straggler.
- **Packing** (`Packer`): GPUs with free capacity; `place` puts a run on the GPU where it fits
  most tightly (best fit), whole-GPU runs on idle GPUs; the driver submits a run only when it
  fits, in order, skipping those that do not fit yet.
- **Host memory** (`estimated_host_memory_gb`, `NodeMemory`): every training worker and explain
  actor asks Ray for the RAM it needs (Ray's `memory` resource, in bytes), from an estimate or,
  once a run of the same model and settings has trained on this study's kind of node, its
  measured peak resident memory (`host_memory.json`) with 20% headroom. The driver starts a run
  only when its workers fit in the nodes' memory left (best fit, like the GPUs), so runs that
  cannot fit together are not started together; Ray enforces the same reservations on its side.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterable, Optional, Sequence

QUARTER = 0.25
CUDA_CONTEXT_GB = 1.5  # CUDA context, cuDNN/cuBLAS workspaces and the allocator's slack
HEADROOM = 1.2  # on a measured peak: other batches, fragmentation
OPTIMIZER_BYTES = {"adam": 16, "adamw": 16, "sgd": 12}  # per parameter: fp32 weight, grad, state
ACTIVATION_BYTES = 4  # bf16 per activation element, x2: the inputs autograd keeps beside the outputs

# Host memory (RAM) per process, measured on the 2-core machine (torch 2.14, one thread: the peak
# resident memory, ru_maxrss, of one process taking two Adam or SGD steps from random init, batch
# 1-32 at 96 and 224 px): `estimated_host_memory_gb` says what each term is and was measured at.
HOST_PROCESS_GB = 1.3  # a Ray Train worker with ray.train, torch, timm and camstudy imported
HOST_TRAINING_BYTES = {"adam": 20, "adamw": 20, "sgd": 16}  # per parameter, training on the CPU
HOST_ACTIVATION_BYTES = 4  # fp32 per activation element counted by registry.forward_cost
HOST_CUDA_GB = 1.0  # CUDA runtime, cuDNN and cuBLAS host-side: not measured here (no GPU); corrected by the peak
HOST_WEIGHT_COPIES_LOADING = 2  # fp32 weights on the host while loading: the model as built, the weights loaded into it
EXPLAIN_MODEL_COPIES = 3  # an explain actor holds the trained model, its randomised twin, the cascade's copy
GB = 1e9


@dataclass(frozen=True)
class Demand:
    """What one run asks of the cluster, and how long it is expected to take."""

    key: str
    gpus: float  # a fraction (< 1) of one GPU, or whole GPUs
    seconds: float  # expected duration: orders the runs


def estimated_memory_gb(params_millions: float, activations_per_image: float, batch: int, optimizer: str) -> float:
    """Training memory of one run on one GPU, in GB."""
    states = params_millions * 1e6 * OPTIMIZER_BYTES.get(optimizer, 16)
    return (states + activations_per_image * batch * ACTIVATION_BYTES) / 1e9 + CUDA_CONTEXT_GB


def estimated_host_memory_gb(params_millions: float, activations_per_image: float, batch: int, optimizer: str,
                             cache_gb: float, on_gpu: bool) -> float:
    """Host memory (RAM) of one training worker, in GB: the peak resident memory Ray must leave it.

    - `HOST_PROCESS_GB`: the interpreter with ray.train, torch, timm and camstudy imported, 1.18 GB
      resident (0.52 GB private, the rest shared library pages counted in every process's RSS,
      as the measured peaks that replace this estimate count them), plus ~0.1 GB of Ray's worker
      runtime and the loop (a Ray Train worker training resnet18 at 32 px peaked at 1.49 GB, of
      which its model, optimizer and activations are ~0.25).
    - the dataset cache, `cache_gb`: training holds every split's float16 images in memory
      (`training.loop.load_device_split`; on a GPU node they pass through the host on the way).
    - on the CPU, per parameter `HOST_TRAINING_BYTES`: fp32 weights, gradients and optimizer state
      (Adam: two moments; SGD: momentum), 4 + 4 + 8 or 4, plus 4 for the gradient-sized
      temporaries of the fused optimizer step and of channels-last weight gradients (measured:
      VGG16 20.1, ResNet101 19.5, ViT-B 17.4 bytes per parameter with Adam; VGG16 15.9 with SGD).
    - on the CPU, activations x batch x `HOST_ACTIVATION_BYTES`: no autocast on the CPU, so fp32,
      about one kept copy of every counted element (measured 1.3-3.8 bytes per element: ViTs at the
      low end, ResNets' BatchNorm-ReLU pairs at the high end).
    - on a GPU node the model, its gradients, optimizer state and activations live on the device;
      the host keeps `HOST_WEIGHT_COPIES_LOADING` fp32 copies of the weights (the model is built on
      the host, pretrained weights are loaded into it; a checkpoint copies the weights back) and
      the CUDA libraries' host memory (`HOST_CUDA_GB`).

    Against the measured peaks (one process outside Ray, 96 and 224 px, batch 1 to 32:
    tests/orchestrator/test_train_runs_memory.py) this estimate is 3-36% above, never below; the ViTs keep fewer
    bytes per counted activation than assumed, so ViT-L is overestimated most.
    """
    fixed = HOST_PROCESS_GB + cache_gb
    if on_gpu:
        return fixed + HOST_CUDA_GB + params_millions * 1e6 * 4 * HOST_WEIGHT_COPIES_LOADING / GB
    training = params_millions * 1e6 * HOST_TRAINING_BYTES.get(optimizer, 20)
    return fixed + (training + activations_per_image * batch * HOST_ACTIVATION_BYTES) / GB


def estimated_explain_memory_gb(params_millions: float, activations_per_image: float, batch: int,
                                on_gpu: bool) -> float:
    """Host memory of one explain actor, in GB: `HOST_PROCESS_GB`, the fp32 weights of the
    `EXPLAIN_MODEL_COPIES` it holds at once for a run (trained, randomised twin, the cascade's
    working copy) and, on the CPU, one CAM batch's activations at `HOST_ACTIVATION_BYTES` (the
    forward keeps what the backward from the target layer needs; `batch` is cam.batch_size). On a
    GPU node the models and activations are on the device: the host holds the weights while
    loading them (two copies) and the CUDA libraries. The cache is memory-mapped, and its clean
    pages are reclaimable, so it is not counted."""
    weights = params_millions * 1e6 * 4
    if on_gpu:
        return HOST_PROCESS_GB + HOST_CUDA_GB + weights * HOST_WEIGHT_COPIES_LOADING / GB
    return HOST_PROCESS_GB + (weights * EXPLAIN_MODEL_COPIES + activations_per_image * batch * HOST_ACTIVATION_BYTES) / GB


def estimated_road_memory_gb(params_millions: float, on_gpu: bool) -> float:
    """Host memory of one ROAD actor (`explain.road.RoadScorer`), in GB: one model and no autograd,
    so the process, the weights while loading them (`HOST_WEIGHT_COPIES_LOADING`) and, on a GPU
    node, the CUDA libraries. Measured on the CPU for the demo's ViT-L (304 M parameters, 96 px):
    3.2 GB peak after loading (0.85 GB of it the imports), unchanged by 64 x 2 ROAD forwards."""
    return HOST_PROCESS_GB + (HOST_CUDA_GB if on_gpu else 0.0) + params_millions * 1e6 * 4 * HOST_WEIGHT_COPIES_LOADING / GB


def gpu_share(memory_gb: float, gpu_memory_gb: float, seconds: float, longest_seconds: float) -> float:
    """The GPU fraction a run asks for: its memory share rounded up to a quarter; 1 when that is
    more than a half or the run is as long as the longest (it would stretch the critical path)."""
    share = math.ceil(memory_gb / gpu_memory_gb / QUARTER) * QUARTER
    if share > 0.5 or seconds >= longest_seconds:
        return float(max(1, math.ceil(memory_gb / gpu_memory_gb)))
    return share


def longest_first(demands: Iterable[Demand]) -> list[Demand]:
    return sorted(demands, key=lambda d: -d.seconds)


class Packer:
    """Free capacity per GPU; fractional runs share a GPU, whole-GPU runs take idle ones."""

    def __init__(self, gpus: int):
        self.free = [1.0] * gpus
        self.held: dict[str, list[tuple[int, float]]] = {}

    def place(self, demand: Demand) -> Optional[list[int]]:
        """The GPUs `demand` takes if it fits now (and takes them), else None."""
        if demand.gpus >= 1:
            idle = [i for i, free in enumerate(self.free) if free >= 1.0]
            if len(idle) < demand.gpus:
                return None
            chosen = [(i, 1.0) for i in idle[:int(demand.gpus)]]
        else:
            fullest = best_fit(self.free, demand.gpus)
            if fullest is None:
                return None
            chosen = [(fullest, demand.gpus)]
        for i, amount in chosen:
            self.free[i] -= amount
        self.held[demand.key] = chosen
        return [i for i, _ in chosen]

    def release(self, key: str) -> None:
        for i, amount in self.held.pop(key, []):
            self.free[i] = min(1.0, self.free[i] + amount)

    def startable(self, pending: Sequence[Demand]) -> list[Demand]:
        """Every pending run that fits now, longest first (placing each)."""
        return [demand for demand in longest_first(pending) if self.place(demand) is not None]


def best_fit(free: Sequence[float], amount: float) -> Optional[int]:
    """The index of the fullest bin (least free) that still holds `amount`, or None."""
    fits = [(room, i) for i, room in enumerate(free) if room >= amount - 1e-9]
    return min(fits)[1] if fits else None


class NodeMemory:
    """Host memory left per node (GB of Ray's `memory` resource); a run's workers each take the
    node where they fit most tightly, as Ray's placement would put them."""

    def __init__(self, nodes_gb: Sequence[float]):
        self.free = list(nodes_gb)
        self.held: dict[str, list[tuple[int, float]]] = {}

    def place(self, key: str, per_worker_gb: float, workers: int = 1, nodes: Optional[Collection[int]] = None) -> bool:
        """Take memory for all `workers` of run `key` on `nodes` (default: any) if they all fit
        now; else take nothing."""
        free, chosen = list(self.free), []
        for _ in range(workers):
            node = best_fit([room if nodes is None or i in nodes else -math.inf for i, room in enumerate(free)],
                            per_worker_gb)
            if node is None:
                return False
            free[node] -= per_worker_gb
            chosen.append((node, per_worker_gb))
        self.free, self.held[key] = free, chosen
        return True

    def release(self, key: str) -> None:
        for node, amount in self.held.pop(key, []):
            self.free[node] += amount

    def fitting(self, per_worker_gb: float) -> int:
        """How many processes of `per_worker_gb` the nodes hold at once (each node on its own)."""
        return sum(int(room / per_worker_gb + 1e-9) for room in self.free)


def simulate(demands: Sequence[Demand], gpus: int) -> float:
    """The makespan of `demands` on `gpus` GPUs when the driver starts what fits, longest first,
    each run taking its expected seconds (co-located runs keep their speed: the shares are sized
    so that they do not contend for memory; bench/gpu_checks.sh measures packed throughput)."""
    if any(d.gpus > gpus for d in demands):
        raise ValueError(f"a run asks for more GPUs than the {gpus} there are")
    packer, pending, running, now = Packer(gpus), list(demands), [], 0.0
    while pending or running:
        for demand in packer.startable(pending):
            pending.remove(demand)
            heapq.heappush(running, (now + demand.seconds, demand.key))
        now, key = heapq.heappop(running)
        packer.release(key)
    return now


def lower_bound(demands: Sequence[Demand], gpus: int) -> float:
    """No schedule ends before its longest run, nor before the total GPU-seconds spread evenly."""
    return max(max(d.seconds for d in demands), sum(d.seconds * d.gpus for d in demands) / gpus)


# --------------------------------------------------------------------------- measured memory


def memory_key(model: str, batch: int, image_size: int, amp: bool, workers: int) -> str:
    return f"{model}|batch{batch}|{image_size}px|amp{int(amp)}|workers{workers}"


def host_memory_key(model: str, batch: int, image_size: int, amp: bool, workers: int, on_gpu: bool) -> str:
    """A training worker's host peak differs between GPU and CPU nodes: the device is in the key."""
    return f"{memory_key(model, batch, image_size, amp, workers)}|{'gpu' if on_gpu else 'cpu'}"


def explain_memory_key(model: str, image_size: int, cam_batch: int, on_gpu: bool) -> str:
    """Where an explain actor's measured host peak for `model` would be recorded (host_memory.json)."""
    return f"explain|{model}|{image_size}px|cam{cam_batch}|{'gpu' if on_gpu else 'cpu'}"


def measured_memory_gb(path: Path, key: str) -> Optional[float]:
    """The peak recorded under `key` in the store's gpu_memory.json (or host_memory.json), if any."""
    try:
        return float(json.loads(Path(path).read_text())[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None
