"""The model copies of the sanity checks (docs/STUDY.md §10, Adebayo et al. 2018).

- The **twin**: the same architecture with fresh random weights (model-parameter randomisation),
  seeded per run so a rerun makes the same twin.
- The **cascade**: a working copy of the trained model re-initialised from the head down, one
  unit at a time (`training.registry.cascade_units`: the head, then each stage of the layer sweep,
  deepest first, the shallowest with the stem), with the twin's weights, so the last step *is* the
  twin and every step is reproducible. Step 0 is the untouched working copy: its maps equal the
  trained model's, which checks that the copy was restored after the previous batch.
"""

from __future__ import annotations

import copy
from typing import Iterator

import torch
from torch import nn

from training import registry

TWIN_SEED_OFFSET = 10_000  # the twin of the run with seed s is initialised with seed 10,000 + s


def twin(spec: registry.ModelSpec, config, seed: int, device: torch.device) -> nn.Module:
    """A fresh random copy of `spec`'s architecture (seeded, eval mode, on `device`)."""
    torch.manual_seed(TWIN_SEED_OFFSET + seed)
    preprocess = config.preprocess
    return registry.build_model(spec, init="random", image_size=preprocess.image_size,
                                in_chans=preprocess.channels).to(device).eval()


class Cascade:
    """Cascading randomisation of `trained` with the weights of `random_twin`."""

    def __init__(self, trained: nn.Module, random_twin: nn.Module, units: tuple[tuple[str, tuple[str, ...]], ...]):
        self.trained, self.twin, self.units = trained, random_twin, units
        self.working = copy.deepcopy(trained).eval()

    def steps(self) -> Iterator[tuple[int, str, nn.Module]]:
        """(0, "", the working copy as trained), then (k, the k-th unit's name, the working copy
        with units 1..k re-initialised); the working copy is the trained model again afterwards,
        also when the caller stops early."""
        done: list[str] = []
        try:
            yield 0, "", self.working
            for k, (name, modules) in enumerate(self.units, 1):
                _copy_state(self.working, self.twin, modules)
                done += modules
                yield k, name, self.working
        finally:
            _copy_state(self.working, self.trained, done)


@torch.no_grad()
def _copy_state(target: nn.Module, source: nn.Module, names) -> None:
    """Every parameter and buffer of the named modules, from `source` into `target`, in place."""
    targets, sources = dict(target.named_modules()), dict(source.named_modules())
    for name in names:
        into, out_of = targets[name], sources[name]
        for key, tensor in (*into._parameters.items(), *into._buffers.items()):
            if tensor is not None:
                tensor.copy_(getattr(out_of, key))
