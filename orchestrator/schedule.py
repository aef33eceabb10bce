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
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

QUARTER = 0.25
CUDA_CONTEXT_GB = 1.5  # CUDA context, cuDNN/cuBLAS workspaces and the allocator's slack
HEADROOM = 1.2  # on a measured peak: other batches, fragmentation
OPTIMIZER_BYTES = {"adam": 16, "adamw": 16, "sgd": 12}  # per parameter: fp32 weight, grad, state
ACTIVATION_BYTES = 4  # bf16 per activation element, x2: the inputs autograd keeps beside the outputs


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
            fits = [(free, i) for i, free in enumerate(self.free) if free >= demand.gpus - 1e-9]
            if not fits:
                return None
            chosen = [(min(fits)[1], demand.gpus)]  # best fit: the fullest GPU it fits on
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


def measured_memory_gb(path: Path, key: str) -> Optional[float]:
    """The peak recorded under `key` in the store's gpu_memory.json, if any."""
    try:
        return float(json.loads(Path(path).read_text())[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None
