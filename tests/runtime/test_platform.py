"""What a run says about the platform it runs on: --cpu_devices only on the CPU, a warning
when a GPU sits unused."""

import importlib.metadata
import types

import jax
import pytest

from lpc_jax.runtime import distributed


@pytest.fixture
def platforms():
    """Sets ``jax_platforms`` (a config value read when the backends start) for one test."""
    before = jax.config.jax_platforms
    yield lambda value: jax.config.update("jax_platforms", value)
    jax.config.update("jax_platforms", before)


@pytest.mark.parametrize("value, expected", [("cpu", "cpu"), ("cuda,cpu", "cuda"), ("gpu", "cuda"), ("tpu", "tpu")])
def test_expected_platform_follows_jax_platforms(platforms, value, expected):
    platforms(value)
    assert distributed.expected_platform() == expected


@pytest.mark.parametrize("plugins, expected", [((), "cpu"), (("cuda12",), "cuda"), (("xla_cuda13",), "cuda")])
def test_expected_platform_finds_installed_plugins(platforms, monkeypatch, plugins, expected):
    platforms("")
    eps = [types.SimpleNamespace(name=n) for n in plugins]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: eps if group == "jax_plugins" else [])
    assert distributed.expected_platform() == expected


def test_cpu_devices_apply_only_on_the_cpu(monkeypatch):
    before = jax.config.jax_num_cpu_devices
    monkeypatch.setattr(distributed, "expected_platform", lambda: "cuda")
    distributed.set_cpu_devices(before + 3)  # would raise (backends started) if it were applied
    assert jax.config.jax_num_cpu_devices == before


def test_warns_when_a_gpu_is_present_but_jax_runs_on_the_cpu(monkeypatch):
    assert jax.default_backend() == "cpu"
    monkeypatch.setattr(distributed, "gpu_present", lambda: True)
    assert "a GPU is present" in distributed.check_accelerator_used()
    assert "[cuda12]" in distributed.check_accelerator_used()
    monkeypatch.setattr(distributed, "gpu_present", lambda: False)
    assert distributed.check_accelerator_used() == ""
