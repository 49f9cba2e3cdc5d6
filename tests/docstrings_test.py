"""Every example in the library's docstrings runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "dpm_jax.channels",
    "dpm_jax.flops",
    "dpm_jax.latency",
    "dpm_jax.groups",
    "dpm_jax.surgery",
    "dpm_jax.report",
    "dpm_jax.pruning.base",
    "dpm_jax.pruning.state",
    "dpm_jax.pruning.criteria",
    "dpm_jax.pruning.allocations",
    "dpm_jax.pruning.schedules",
    "dpm_jax.pruning.removals",
    "dpm_jax.pruning.recipes",
    "dpm_jax.pruning.transform",
    "dpm_jax.checkpoint",
    "train.parallel",
    "train.tensorboard",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
