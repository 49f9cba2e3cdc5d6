"""Tests for ``Recipe`` validation, its event schedule and the presets."""

from __future__ import annotations

import dataclasses
import doctest

import pytest

from dpm_jax import recipes
from dpm_jax.recipes import Recipe


@pytest.mark.parametrize("kwargs, field", [
    (dict(criterion="taylor"), "criterion"),
    (dict(allocation="adaptive"), "allocation"),
    (dict(removal="soft"), "removal"),
    (dict(logic="xor"), "logic"),
    (dict(target_flops=0.0), "target_flops"),
    (dict(target_flops=-0.5), "target_flops"),
    (dict(target_flops=1.01), "target_flops"),
    (dict(min_channels=0), "min_channels"),
    (dict(min_fraction=-0.1), "min_fraction"),
    (dict(min_fraction=1.0), "min_fraction"),
    (dict(start_step=-1), "start_step"),
    (dict(start_step=10, end_step=5), "end_step"),
    (dict(num_events=0), "num_events"),
    (dict(num_events=3, start_step=5, end_step=5), "num_events"),
    (dict(decay_steps=0), "decay_steps"),
    (dict(decay_steps=-3), "decay_steps"),
    (dict(len_threshold=-0.1), "len_threshold"),
    (dict(rate_threshold=1.0), "rate_threshold"),
    (dict(rate_threshold=-1.0), "rate_threshold"),
    (dict(ema_decay=1.0), "ema_decay"),
    (dict(ema_decay=-0.1), "ema_decay"),
    (dict(min_decay_steps=-1), "min_decay_steps"),
    (dict(removal="dpm", decay_steps=10, min_decay_steps=10), "min_decay_steps"),
    (dict(cooldown=-1), "cooldown"),
])
def test_invalid_field_is_a_value_error_naming_it(kwargs, field):
  with pytest.raises(ValueError, match=rf"Invalid pruning recipe: (.* )?{field}="):
    Recipe(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(target_flops=1.0),
    dict(target_flops=1e-3),
    dict(min_fraction=0.0, min_channels=1),
    dict(decay_steps=1, min_decay_steps=0),
    dict(rate_threshold=-0.99, len_threshold=0.0, ema_decay=0.0, cooldown=0),
    dict(start_step=0, end_step=0, num_events=1),
    # min_decay_steps only matters for self-rectifying.
    dict(removal="dpm_sp", decay_steps=5, min_decay_steps=10),
    dict(removal="hard", decay_steps=1),
])
def test_valid_edges(kwargs):
  Recipe(**kwargs)


def test_unknown_choice_lists_the_allowed_ones():
  with pytest.raises(ValueError, match="choose one of group_l2|l1, l2, group_l2"):
    Recipe(criterion="l3")
  with pytest.raises(ValueError, match="hard, dpm_sp, dpm"):
    Recipe(removal="soft")


def test_recipe_is_frozen_hashable_and_replace_validates():
  r = Recipe()
  with pytest.raises(dataclasses.FrozenInstanceError):
    r.target_flops = 0.3
  assert hash(r) == hash(Recipe())
  assert r == Recipe()
  r2 = r.replace(target_flops=0.3)
  assert r2.target_flops == 0.3 and r.target_flops == 0.5
  with pytest.raises(ValueError, match="decay_steps="):
    r.replace(decay_steps=0)


def test_defaults():
  r = Recipe()
  assert (r.criterion, r.allocation, r.removal, r.logic) == ("group_l2", "global", "dpm", "and")
  assert r.target_flops == 0.5 and r.min_channels == 1
  assert 0 <= r.min_decay_steps < r.decay_steps


# ----------------------------------------------------------------------------------------
# The event schedule.


def test_one_shot_events():
  r = Recipe(start_step=7, end_step=7, target_flops=0.4)
  assert r.event_steps == (7,)
  assert r.event_targets == pytest.approx((0.4,))


def test_iterative_events_are_evenly_spaced_with_linear_targets():
  r = Recipe(start_step=10, end_step=40, num_events=4, target_flops=0.5)
  assert r.event_steps == (10, 20, 30, 40)
  assert r.event_targets == pytest.approx((0.875, 0.75, 0.625, 0.5))
  # Uneven spans are rounded; the first and last events are the start and end steps.
  r = Recipe(start_step=0, end_step=10, num_events=4)
  assert r.event_steps == (0, 3, 7, 10)
  assert len(set(r.event_steps)) == 4


def test_last_step():
  assert Recipe(removal="hard", end_step=30, start_step=30).last_step == 30
  assert Recipe(removal="dpm_sp", end_step=30, start_step=30, decay_steps=20).last_step == 50
  assert Recipe(removal="dpm", end_step=30, start_step=30, decay_steps=20).last_step == 50


# ----------------------------------------------------------------------------------------
# Presets.


def test_depgraph_preset():
  # Iterative over a span; without one (the defaults) one-shot at step 0.
  r = recipes.depgraph(start_step=0, end_step=8)
  assert (r.criterion, r.allocation, r.removal, r.num_events) == (
      "group_l2", "global", "hard", 5)
  assert r.event_steps == (0, 2, 4, 6, 8)
  assert r.target_flops == 0.5
  r = recipes.depgraph(target_flops=0.5, removal="dpm")
  assert (r.num_events, r.event_steps, r.removal) == (1, (0,), "dpm")
  r = recipes.depgraph(target_flops=0.3, removal="dpm", start_step=100, end_step=500,
                       decay_steps=50, num_events=3)
  assert (r.target_flops, r.removal, r.num_events, r.decay_steps) == (0.3, "dpm", 3, 50)
  assert r.event_steps == (100, 300, 500)
  for removal in recipes.REMOVALS:
    assert recipes.depgraph(removal=removal, start_step=0, end_step=8).removal == removal


def test_magnitude_preset():
  r = recipes.magnitude()
  assert (r.criterion, r.allocation, r.removal, r.num_events) == ("l1", "uniform", "hard", 1)
  r = recipes.magnitude(target_flops=0.6, criterion="l2", allocation="global",
                        removal="dpm_sp", decay_steps=4)
  assert (r.target_flops, r.criterion, r.allocation, r.removal, r.decay_steps) == (
      0.6, "l2", "global", "dpm_sp", 4)


def test_presets_validate():
  with pytest.raises(ValueError, match="target_flops="):
    recipes.depgraph(target_flops=2.0)
  with pytest.raises(ValueError, match="removal="):
    recipes.magnitude(removal="soft")
  with pytest.raises(ValueError, match="num_events="):
    recipes.depgraph(start_step=5, end_step=5, num_events=5)   # 5 events need a span


def test_docstring_examples():
  result = doctest.testmod(recipes, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
