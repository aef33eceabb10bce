"""Every private or developer API of Ray that camstudy uses (training/ray_private.py) is still
where camstudy looks for it in the installed Ray: a Ray upgrade that moves one fails here, by
name, rather than in the middle of a study."""

import importlib
import inspect

from training import ray_private


def test_the_backpressure_policies_the_stages_filter():
    policies = ray_private.backpressure_policies()
    assert isinstance(policies.ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, str)
    assert policies.ResourceBudgetBackpressurePolicy in policies.ENABLED_BACKPRESSURE_POLICIES


def test_the_bootstrap_address_comes_from_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "192.0.2.7:6379")  # TEST-NET: never a local cluster
    assert ray_private.bootstrap_address() == "192.0.2.7:6379"


def test_the_raylet_message_printer_that_is_wrapped():
    printer = ray_private.worker_module().print_to_stdstream
    assert list(inspect.signature(printer).parameters)[:2] == ["data", "ignore_prefix"]


def test_the_v2_base_class_of_the_torch_trainer():
    from ray.train.torch import TorchTrainer

    assert issubclass(TorchTrainer, ray_private.v2_data_parallel_trainer())


def test_the_loggers_whose_notices_are_dropped_are_ray_modules():
    for name in (ray_private.TOKEN_AUTH_LOGGER, ray_private.PROGRESS_LOGGER):
        importlib.import_module(name)
