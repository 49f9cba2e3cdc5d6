"""Tests for recipes: the parts' validation, the schedules, the registry and the presets."""

from __future__ import annotations

import dataclasses
import doctest
import inspect

import jax.numpy as jnp
import pytest

from dpm_jax import pruning
from dpm_jax import recipes
from dpm_jax.pruning import allocations, criteria, removals, schedules
from dpm_jax.pruning.recipes import Recipe


@pytest.mark.parametrize("kwargs, field", [
    (dict(criterion="hessian"), "criterion"),
    (dict(allocation="hessian"), "allocation"),
    (dict(removal="gradual"), "removal"),
    (dict(removal="dpm", logic="xor"), "logic"),
    (dict(target_flops=0.0), "target_flops"),
    (dict(target_flops=-0.5), "target_flops"),
    (dict(target_flops=1.01), "target_flops"),
    (dict(target_flops="0.5"), "target_flops"),
    (dict(min_channels=0), "min_channels"),
    (dict(min_channels=1.5), "min_channels"),
    (dict(min_fraction=-0.1), "min_fraction"),
    (dict(min_fraction=1.0), "min_fraction"),
    (dict(flops_tolerance=1.0), "flops_tolerance"),
    (dict(start_step=-1), "start_step"),
    (dict(start_step=10, end_step=5), "end_step"),
    (dict(num_events=0), "num_events"),
    (dict(num_events=2.5, start_step=0, end_step=5), "num_events"),
    (dict(num_events=3, start_step=5, end_step=5), "num_events"),
    (dict(removal="dpm_sp", decay_steps=0), "decay_steps"),
    (dict(removal="dpm", decay_steps=-3), "decay_steps"),
    (dict(removal="dpm", decay_steps="500"), "decay_steps"),
    (dict(removal="dpm", decay_steps=10.5), "decay_steps"),
    (dict(removal="dpm", len_threshold=-0.1), "len_threshold"),
    (dict(removal="dpm", rate_threshold=1.0), "rate_threshold"),
    (dict(removal="dpm", rate_threshold=-1.0), "rate_threshold"),
    (dict(removal="dpm", ema_decay=1.0), "ema_decay"),
    (dict(removal="dpm", ema_decay=-0.1), "ema_decay"),
    (dict(removal="dpm", min_decay_steps=-1), "min_decay_steps"),
    (dict(removal="dpm", decay_steps=10, min_decay_steps=10), "min_decay_steps"),
    (dict(removal="dpm", cooldown=-1), "cooldown"),
    (dict(removal="dpm", cooldown=True), "cooldown"),
])
def test_invalid_field_is_a_value_error_naming_it(kwargs, field):
  with pytest.raises(ValueError, match=rf"{field}="):
    recipes.depgraph(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(target_flops=1.0),
    dict(target_flops=1e-3),
    dict(min_fraction=0.0, min_channels=1),
    dict(removal="dpm", decay_steps=1, min_decay_steps=0),
    dict(removal="dpm", rate_threshold=-0.99, len_threshold=0.0, ema_decay=0.0, cooldown=0),
    dict(start_step=0, end_step=0, num_events=1),
    # min_decay_steps only matters for self-rectifying.
    dict(removal="dpm_sp", decay_steps=5),
    dict(removal="soft"),
])
def test_valid_edges(kwargs):
  recipes.depgraph(**kwargs)


def test_unknown_choice_lists_the_allowed_ones():
  with pytest.raises(ValueError, match="criterion='l3'; choose one of l1, l2, group_l2"):
    recipes.depgraph(criterion="l3")
  with pytest.raises(ValueError, match="choose one of hard, soft, dpm_sp, dpm"):
    recipes.depgraph(removal="gradual")
  with pytest.raises(ValueError, match="zero='all'; choose one of weights, producers"):
    recipes.depgraph(removal="soft", zero="all")


def test_an_option_no_part_takes_is_an_error_naming_what_they_take():
  # decay_steps is smooth pruning's; a hard removal does not decay.
  with pytest.raises(ValueError, match=r"decay_steps.*removal=Hard.*take: end_step"):
    recipes.depgraph(removal="hard", decay_steps=5)
  with pytest.raises(ValueError, match="interval"):
    recipes.depgraph(interval=10)
  # A part passed as a value takes no options through the preset.
  with pytest.raises(ValueError, match="decay_steps"):
    recipes.depgraph(removal=removals.SmoothPruning(decay_steps=4), decay_steps=5)


def test_option_names_follow_the_chosen_parts():
  assert recipes.option_names("depgraph", removal="hard") == {
      "start_step", "end_step", "num_events", "min_channels", "min_fraction",
      "flops_tolerance", "normalize", "sparse_learning", "reg", "alpha", "round_to"}
  # Parts inside parts: OTOv2's projection hands channels to the removal named.
  assert {"eps", "lmbda", "decay_steps"} <= recipes.option_names("otov2", removal="dpm_sp")
  assert "weights_only" in recipes.option_names("depgraph", criterion="l2")
  dpm = recipes.option_names("depgraph", removal="dpm")
  assert {"decay_steps", "cooldown", "rate_threshold", "start_step"} <= dpm
  sfp = recipes.option_names("sfp")
  assert "interval" in sfp and "zero" in sfp and "num_events" not in sfp
  assert "decay_steps" in recipes.option_names("sfp", removal="dpm_sp")
  with pytest.raises(ValueError, match="Unknown pruning method 'otov9'"):
    recipes.option_names("otov9")


def test_recipe_is_frozen_hashable_and_replace_validates():
  r = recipes.depgraph()
  with pytest.raises(dataclasses.FrozenInstanceError):
    r.target_flops = 0.3
  assert hash(r) == hash(recipes.depgraph())
  assert r == recipes.depgraph()
  r2 = r.replace(target_flops=0.3)
  assert r2.target_flops == 0.3 and r.target_flops == 0.5
  with pytest.raises(ValueError, match="target_flops="):
    r.replace(target_flops=0.0)


def test_a_recipe_holds_parts():
  parts = dict(criterion=criteria.L2(), allocation=allocations.Global(),
               schedule=schedules.Iterative(), removal=removals.Hard())
  Recipe(0.5, **parts)
  for kind in parts:
    with pytest.raises(TypeError, match=f"{kind}="):
      Recipe(0.5, **{**parts, kind: "l2"})


def test_a_user_part_goes_into_a_preset():

  @dataclasses.dataclass(frozen=True)
  class Ones(pruning.Criterion):
    def score(self, ctx, state, params):
      return jnp.ones(ctx.num_channels)

  r = recipes.depgraph(criterion=Ones(), removal="dpm", decay_steps=20)
  assert isinstance(r.criterion, Ones) and r.removal.decay_steps == 20


# ----------------------------------------------------------------------------------------
# Schedules.


def test_one_shot_events():
  s = schedules.Iterative(start_step=7)
  assert s.event_steps == (7,) and s.last_event == 7
  assert s.targets(0.4) == pytest.approx((0.4,))


def test_iterative_events_are_evenly_spaced_with_linear_targets():
  s = schedules.Iterative(start_step=10, end_step=40, num_events=4)
  assert s.event_steps == (10, 20, 30, 40)
  assert s.targets(0.5) == pytest.approx((0.875, 0.75, 0.625, 0.5))
  # Uneven spans are rounded; the first and last events are the start and end steps.
  s = schedules.Iterative(start_step=0, end_step=10, num_events=4)
  assert s.event_steps == (0, 3, 7, 10)
  assert len(set(s.event_steps)) == 4


def test_interval_events():
  s = schedules.Interval(start_step=5, end_step=25, interval=10)
  assert s.event_steps == (5, 15, 25) and s.last_event == 25
  # The end is always an event: the last selection is made from the last weights.
  s = schedules.Interval(start_step=5, end_step=21, interval=10)
  assert s.event_steps == (5, 15, 21) and s.last_event == 21
  with pytest.raises(ValueError, match="interval=0"):
    schedules.Interval(interval=0)


def test_last_step():
  one_shot = dict(start_step=30)
  assert recipes.depgraph(removal="hard", **one_shot).last_step == 30
  assert recipes.depgraph(removal="soft", **one_shot).last_step == 30
  assert recipes.depgraph(removal="dpm_sp", decay_steps=20, **one_shot).last_step == 50
  # Self-rectifying releases for one decay after the last event; the last replacement
  # then decays for one more.
  assert recipes.depgraph(removal="dpm", decay_steps=20, **one_shot).last_step == 70
  assert recipes.depgraph(removal="dpm", decay_steps=20, release_steps=5,
                          **one_shot).last_step == 55
  with pytest.raises(ValueError, match="release_steps"):
    recipes.depgraph(removal="dpm", release_steps=-1)


# ----------------------------------------------------------------------------------------
# Presets.


def _names(r: Recipe) -> tuple[str, ...]:
  return tuple(type(p).__name__ for p in (r.criterion, r.allocation, r.schedule, r.removal))


def test_depgraph_preset():
  # Iterative over a span; without one (the defaults) one-shot at step 0.
  r = recipes.depgraph(start_step=0, end_step=8)
  assert _names(r) == ("GroupL2", "Global", "Iterative", "Hard")
  assert r.schedule.num_events == 5 and r.schedule.event_steps == (0, 2, 4, 6, 8)
  assert r.target_flops == 0.5 and r.regularizer is None
  r = recipes.depgraph(target_flops=0.5, removal="dpm")
  assert r.schedule.event_steps == (0,) and isinstance(r.removal, removals.SelfRectifying)
  r = recipes.depgraph(target_flops=0.3, removal="dpm", start_step=100, end_step=500,
                       decay_steps=50, num_events=3)
  assert (r.target_flops, r.removal.decay_steps, r.schedule.event_steps) == (
      0.3, 50, (100, 300, 500))
  for name, cls in recipes.REMOVALS.items():
    assert type(recipes.depgraph(removal=name, start_step=0, end_step=8).removal) is cls


def test_magnitude_preset():
  r = recipes.magnitude()
  assert _names(r) == ("L1", "Uniform", "Iterative", "Hard")
  assert r.schedule.event_steps == (0,)
  r = recipes.magnitude(target_flops=0.6, criterion="l2", allocation="global",
                        removal="dpm_sp", decay_steps=4)
  assert _names(r) == ("L2", "Global", "Iterative", "SmoothPruning")
  assert (r.target_flops, r.removal.decay_steps) == (0.6, 4)


def test_sfp_preset():
  r = recipes.sfp(target_flops=0.6, start_step=0, end_step=100, interval=20)
  assert _names(r) == ("L2", "Uniform", "Interval", "Soft")
  assert r.schedule.event_steps == (0, 20, 40, 60, 80, 100)
  # SFP ranks filters by the L2 norm of their weights; it zeroes every producer slice
  # (zero='weights': the weights only, as SFP's reference code).
  assert r.criterion == criteria.L2(weights_only=True)
  assert r.removal == removals.Soft(zero="producers")
  assert recipes.sfp(weights_only=False).criterion == criteria.L2()
  assert recipes.sfp(zero="weights").removal == removals.Soft(zero="weights")
  assert recipes.sfp(allocation="global").allocation == allocations.Global()


def test_sfp_with_smooth_pruning_decays_to_a_soft_zero():
  r = recipes.sfp(removal="dpm_sp", start_step=0, end_step=100, interval=20, decay_steps=5)
  assert r.removal == removals.SmoothPruning(decay_steps=5, soft=True)
  r = recipes.sfp(removal="dpm", start_step=0, end_step=100, interval=20, decay_steps=5,
                  min_decay_steps=1)
  assert isinstance(r.removal, removals.SelfRectifying) and r.removal.soft
  # A decay must end before the next event selects afresh.
  with pytest.raises(ValueError, match="decay_steps=20 while events are 20 steps apart"):
    recipes.sfp(removal="dpm_sp", start_step=0, end_step=100, interval=20, decay_steps=20)
  with pytest.raises(ValueError, match="decay_steps=10 while events are 5 steps apart"):
    recipes.sfp(removal="dpm_sp", start_step=0, end_step=45, interval=20, decay_steps=10)


def test_sfp_rejects_hard_removal():
  with pytest.raises(ValueError, match="its removal is 'soft'"):
    recipes.sfp(removal="hard")


def test_psap_preset():
  r = recipes.psap(target_flops=0.3, start_step=0, end_step=100, interval=20, gamma=2.0)
  assert _names(r) == ("L2", "Adaptive", "Interval", "Protective")
  assert r.removal.gamma == 2.0 and r.allocation.p_max == 0.9
  assert isinstance(recipes.psap(removal="soft").removal, removals.Soft)
  with pytest.raises(ValueError, match="its removals are 'protective' and 'soft'"):
    recipes.psap(removal="dpm")


@pytest.mark.parametrize("kwargs, field", [
    (dict(sparsity_threshold=0.0), "sparsity_threshold"),
    (dict(sparsity_threshold=-1.0), "sparsity_threshold"),
    (dict(channel_fraction=0.0), "channel_fraction"),
    (dict(sparsity="bias"), "sparsity"),
    (dict(p_min=-0.1), "p_min"),
    (dict(p_max=1.0), "p_max"),
    (dict(p_max=0.0), "p_max"),
    (dict(p_min=0.6, p_max=0.5), "p_min"),
    (dict(gamma=-1.0), "gamma"),
    (dict(ema_decay=1.0), "ema_decay"),
    (dict(protect_events=-1), "protect_events"),
    (dict(protect_events=1.5), "protect_events"),
    (dict(zero="kernels"), "zero"),
])
def test_bad_psap_input_is_a_value_error_naming_it(kwargs, field):
  with pytest.raises(ValueError, match=rf"{field}="):
    recipes.psap(**kwargs)


def test_registry_names_every_preset():
  assert set(recipes.PRESETS) == {"depgraph", "magnitude", "sfp", "psap", "gate_decorator",
                                  "otov2"}
  for name, preset in recipes.PRESETS.items():
    assert isinstance(preset(), Recipe), name


def test_docstring_examples():
  for module in (recipes, schedules):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, module.__name__


def _option_defaults(method: str, removal: str | None) -> dict[str, object]:
  """Every option of ``method`` with its declared default (fields of its parts, keywords)."""
  kw = {"removal": removal} if removal else {}
  recipe = recipes.PRESETS[method](target_flops=0.5, **kw)
  out: dict[str, object] = {}
  todo = [recipe.criterion, recipe.allocation, recipe.schedule, recipe.removal,
          recipe.regularizer]
  while todo:
    part = todo.pop()
    if dataclasses.is_dataclass(part) and not isinstance(part, type):
      for f in dataclasses.fields(part):
        value = getattr(part, f.name)
        if dataclasses.is_dataclass(value):
          todo.append(value)
        else:
          out.setdefault(f.name, f.default if f.default is None else value)
  out["round_to"] = recipe.round_to  # the recipe's own
  for name, p in inspect.signature(recipes.PRESETS[method]).parameters.items():
    if p.kind == p.KEYWORD_ONLY and p.default is not inspect.Parameter.empty:
      out.setdefault(name, p.default)
  return out


def _wrong_values(default: object) -> list[object]:
  if default is None:
    return ["3", 2.5]
  if isinstance(default, bool):
    return ["yes", 1]
  if isinstance(default, int):
    return ["500", 10.5, None]
  if isinstance(default, float):
    return ["0.5", None]
  if isinstance(default, str):
    return ["no_such_choice", 3]
  if isinstance(default, tuple):
    return ["scale", ()]
  raise AssertionError(f"no wrong values for {default!r}")


@pytest.mark.parametrize("method,removal", [
    (m, r) for m in sorted(recipes.PRESETS) for r in (None, "soft" if m == "psap" else "dpm")])
def test_every_option_is_type_checked_by_name(method, removal):
  # decay_steps="500" once failed deep inside without naming the field; 10.5 and
  # num_events=2.5 were accepted.
  kw = {"removal": removal} if removal else {}
  names = recipes.option_names(method, **kw)
  defaults = _option_defaults(method, removal)
  for name in sorted(names):
    for value in _wrong_values(defaults[name]):
      with pytest.raises(ValueError, match=rf"\b{name}="):
        recipes.PRESETS[method](target_flops=0.5, **kw, **{name: value})
