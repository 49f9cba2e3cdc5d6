"""Recipes: a composition of parts, the registry of their names, and the published presets.

A ``Recipe`` holds a target and five parts (criterion, allocation, schedule, removal,
regularizer); ``dpm_jax.prune(inner, spec, recipe)`` runs it. The presets reproduce the base
methods; ``removal="dpm_sp"`` gives the DPM paper's "+SP" row (smooth pruning) and
``removal="dpm"`` its "+SR" row (smooth pruning + self-rectifying) for each of them.

Names live here only: ``CRITERIA``, ``ALLOCATIONS``, ``REMOVALS`` and ``PRESETS`` map the
strings that presets, configs and the command line use to the parts. A preset takes a name or
a part for each slot, and keyword options that go to the part that has a field of that name
(``decay_steps`` to the removal, ``min_channels`` to the allocation, ``start_step`` to the
schedule); an option no chosen part takes is an error.

Example:

  >>> from dpm_jax import recipes
  >>> r = recipes.depgraph(target_flops=0.5, removal="dpm", start_step=100, end_step=400,
  ...                      decay_steps=50)
  >>> type(r.criterion).__name__, type(r.allocation).__name__, r.removal.decay_steps
  ('GroupL2', 'Global', 50)
  >>> r.schedule.event_steps, r.last_step   # releases for 50 steps, a last decay of 50
  ((100, 175, 250, 325, 400), 500)
  >>> recipes.sfp(target_flops=0.6, interval=44, end_step=400).removal
  Soft(zero='producers')
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from dpm_jax.flops import CostModel, FlopsModel
from dpm_jax.groups import GroupSpec
from dpm_jax.pruning import allocations
from dpm_jax.pruning import criteria
from dpm_jax.pruning import regularizers
from dpm_jax.pruning import removals
from dpm_jax.pruning import schedules
from dpm_jax.pruning.base import (Allocation, Criterion, Regularizer, Removal, Schedule,
                                  check_float, check_int)

__all__ = [
    "Recipe",
    "CRITERIA",
    "ALLOCATIONS",
    "REMOVALS",
    "PRESETS",
    "make",
    "option_names",
    "depgraph",
    "magnitude",
    "sfp",
    "psap",
    "gate_decorator",
    "otov2",
]

CRITERIA: Mapping[str, type[Criterion]] = {
    "l1": criteria.L1,
    "l2": criteria.L2,
    "group_l2": criteria.GroupL2,
    "taylor": criteria.Taylor,
    "saliency": criteria.Saliency,
}
ALLOCATIONS: Mapping[str, type[Allocation]] = {
    "global": allocations.Global,
    "uniform": allocations.Uniform,
    "adaptive": allocations.Adaptive,
    "widths": allocations.Widths,
}
REMOVALS: Mapping[str, type[Removal]] = {
    "hard": removals.Hard,
    "soft": removals.Soft,
    "dpm_sp": removals.SmoothPruning,
    "dpm": removals.SelfRectifying,
    "protective": removals.Protective,
}
_KINDS = {"criterion": (Criterion, "score"), "allocation": (Allocation, "select"),
          "schedule": (Schedule, "event"), "removal": (Removal, "land"),
          "regularizer": (Regularizer, "update")}


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What to prune, how much, when, and how.

  Attributes:
    target_flops: the fraction of the dense network's FLOPs that remains at the end (0.5
      halves the MACs), counted from the traced layers (``dpm_jax.spec_cost``); with a
      latency ``cost``, the fraction of its predicted latency.
    criterion: channel importance (``dpm_jax.pruning.criteria``).
    allocation: which channels go at an event (``dpm_jax.pruning.allocations``).
    schedule: when events happen (``dpm_jax.pruning.schedules``).
    removal: what selection does and how steps land (``dpm_jax.pruning.removals``).
    regularizer: a gradient term before the inner optimizer, or ``None``.
    round_to: every group keeps a multiple of this many channels (or all of them), one
      value for all groups or a tuple with one per group; 1 (the default) leaves widths as
      the allocation chooses. 8 suits GPUs, 128 TPU lanes: uneven widths can make a
      pruned network no faster (see ``allocations.round_widths``).
    cost: builds the cost ``target_flops`` is a fraction of from the spec:
      ``FlopsModel.build`` (MACs, the default) or a ``dpm_jax.latency.LatencyTable``
      (predicted latency on the device it was measured on; ``round_to`` must then be a
      multiple of the table's ``step``).
  """

  target_flops: float
  criterion: Criterion
  allocation: Allocation
  schedule: Schedule
  removal: Removal
  regularizer: Regularizer | None = None
  round_to: int | tuple[int, ...] = 1
  cost: Callable[[GroupSpec], CostModel] = FlopsModel.build

  def __post_init__(self):
    t = self.target_flops
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= 1.0:
      raise ValueError(f"Invalid pruning recipe: target_flops={t!r} must be a number in (0, 1]: "
                       "it is the fraction of the dense network's FLOPs that remains (0.5 "
                       "halves them).")
    r = self.round_to
    if isinstance(r, list):
      object.__setattr__(self, "round_to", tuple(r))
    values = self.round_to if isinstance(self.round_to, tuple) else (self.round_to,)
    if not values or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                             and v >= 1 for v in values):
      raise ValueError(f"Invalid pruning recipe: round_to={r!r} must be an int >= 1 (or a "
                       "tuple of them, one per group): every group keeps a multiple of it.")
    if not callable(self.cost):
      raise TypeError(f"Invalid pruning recipe: cost={self.cost!r} must build a cost model "
                      "from the spec: FlopsModel.build (the default) or a "
                      "dpm_jax.latency.LatencyTable.")
    for kind, (base, method) in _KINDS.items():
      part = getattr(self, kind)
      if part is None and kind == "regularizer":
        continue
      if not (isinstance(part, base) or callable(getattr(part, method, None))):
        raise TypeError(f"Invalid pruning recipe: {kind}={part!r} is not a {base.__name__} "
                        f"(subclass dpm_jax.pruning.{base.__name__}, or pass a name).")

  @property
  def last_step(self) -> int:
    """The step by which every selected channel is removed (without releases)."""
    return self.schedule.last_event + self.removal.settle_steps

  def replace(self, **changes: Any) -> Recipe:
    return dataclasses.replace(self, **changes)


def _fields(part: Any) -> set[str]:
  cls = part if isinstance(part, type) else type(part)
  return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def _part(kind: str, value: Any, registry: Mapping[str, type], options: dict[str, Any]) -> Any:
  """``value`` if it is a part; else the registered part of that name, built with the
  options it has fields for (taken out of ``options``)."""
  if not isinstance(value, str):
    return value
  if value not in registry:
    raise ValueError(f"Invalid pruning recipe: {kind}={value!r}; choose one of "
                     f"{', '.join(registry)}.")
  cls = registry[value]
  return cls(**{k: options.pop(k) for k in list(options) if k in _fields(cls)})


def _done(method: str, options: dict[str, Any], parts: dict[str, Any]) -> None:
  if options:
    takes = sorted(set().union(*(_fields(p) for p in parts.values())))
    chosen = ", ".join(f"{k}={type(p).__name__}" for k, p in parts.items())
    raise ValueError(
        f"Invalid pruning recipe: {method}() got option(s) {', '.join(sorted(options))} that "
        f"none of its parts ({chosen}) takes; they take: {', '.join(takes) or 'nothing'}.")


def make(method: str, target_flops: float, *, criterion: Any, allocation: Any, schedule: Any,
         removal: Any, regularizer: Any = None, **options: Any) -> Recipe:
  """Builds a recipe from names or parts, routing ``options`` to the parts that take them.

  Args:
    method: the preset's name, for error messages.
    target_flops: the fraction of the dense FLOPs that remains.
    criterion: a name in ``CRITERIA`` or a ``Criterion``.
    allocation: a name in ``ALLOCATIONS`` or an ``Allocation``.
    schedule: a ``Schedule`` class (built with the options it takes) or a ``Schedule``.
    removal: a name in ``REMOVALS`` or a ``Removal``.
    regularizer: a ``Regularizer`` or ``None``.
    **options: fields of the parts built from names, and the recipe's ``round_to`` and
      ``cost``.
  """
  options = dict(options)
  round_to = options.pop("round_to", 1)
  cost = options.pop("cost", FlopsModel.build)
  parts = {
      "criterion": _part("criterion", criterion, CRITERIA, options),
      "allocation": _part("allocation", allocation, ALLOCATIONS, options),
      "removal": _part("removal", removal, REMOVALS, options),
  }
  if isinstance(schedule, type):
    schedule = schedule(**{k: options.pop(k) for k in list(options) if k in _fields(schedule)})
  parts["schedule"] = schedule
  _done(method, options, parts)
  return Recipe(target_flops, regularizer=regularizer, round_to=round_to, cost=cost, **parts)


def depgraph(target_flops: float = 0.5, removal: str | Removal = "hard", *,
             criterion: str | Criterion = "group_l2", allocation: str | Allocation = "global",
             regularizer: Regularizer | None = None, sparse_learning: bool = False,
             reg: float = 5e-4, alpha: float = 16.0, **options: Any) -> Recipe:
  """DepGraph (Fang et al. 2023): group-L2 importance over every coupled slice, ranked
  globally, removed iteratively: ``num_events`` (5 when ``end_step > start_step``, else one
  shot) from ``start_step`` to ``end_step``. ``removal='dpm_sp'|'dpm'`` gives DPM's +SP /
  +SR; options go to the parts (see the module docstring).

  ``sparse_learning=True`` adds DepGraph's sparse learning (``regularizers.GroupLasso`` with
  ``reg`` and ``alpha``) for the whole prune phase: the steps before ``start_step`` are its
  sparse-training phase, and it keeps pushing during the pruning."""
  if not isinstance(sparse_learning, bool):
    raise ValueError(f"Invalid pruning recipe: depgraph(sparse_learning={sparse_learning!r}) "
                     "must be a bool.")
  check_float("depgraph", "reg", reg, 0.0, float("inf"))
  check_float("depgraph", "alpha", alpha, 1.0, float("inf"))
  for name in ("start_step", "end_step"):
    if options.get(name) is not None:
      check_int("depgraph", name, options[name], 0)
  if sparse_learning:
    if regularizer is not None:
      raise ValueError("Invalid pruning recipe: depgraph(sparse_learning=True) is a "
                       "regularizer of its own; pass one or the other.")
    regularizer = regularizers.GroupLasso(reg=reg, alpha=alpha)
  if "num_events" not in options:
    start = options.get("start_step") or 0
    end = options.get("end_step") or start
    options["num_events"] = 5 if end > start else 1
  return make("depgraph", target_flops, criterion=criterion, allocation=allocation,
              schedule=schedules.Iterative, removal=removal, regularizer=regularizer, **options)


def magnitude(target_flops: float = 0.5, removal: str | Removal = "hard", *,
              criterion: str | Criterion = "l1", allocation: str | Allocation = "uniform",
              regularizer: Regularizer | None = None, **options: Any) -> Recipe:
  """Magnitude pruning (Li et al. 2017, "Pruning filters for efficient convnets"): the
  filters with the smallest L1 norm, the same fraction in every layer by default, one shot
  at ``start_step`` unless ``num_events`` says otherwise."""
  return make("magnitude", target_flops, criterion=criterion, allocation=allocation,
              schedule=schedules.Iterative, removal=removal, regularizer=regularizer, **options)


def sfp(target_flops: float = 0.5, removal: str | Removal = "soft", *,
        criterion: str | Criterion = "l2", allocation: str | Allocation = "uniform",
        regularizer: Regularizer | None = None, **options: Any) -> Recipe:
  """Soft filter pruning (He et al., IJCAI 2018): every ``interval`` steps from
  ``start_step``, and at ``end_step``, the filters of each group whose weights have the
  lowest L2 norm are zeroed at the same ratio per group (``allocation='global'`` for a
  FLOPs-ranked choice), but keep training and may regrow; each event selects afresh from the
  current weights; ``finalize`` zeroes the last selection for surgery. SFP's ``--rate`` is
  the fraction of filters kept; here the target is in FLOPs.

  ``removal='dpm_sp'`` (our reading of SFP + smooth pruning): a selected filter decays to
  zero over ``decay_steps`` steps instead of at once, then is free to regrow;
  ``removal='dpm'`` adds self-rectifying during the decay. A decay must end before the next
  event. ``'hard'`` is not soft pruning (use ``magnitude`` or ``depgraph``).
  """
  if removal == "hard":
    raise ValueError("Invalid pruning recipe: sfp(removal='hard'): soft filter pruning zeroes "
                     "filters and lets them regrow, so its removal is 'soft' (or 'dpm_sp', "
                     "'dpm': a smooth decay to a soft zero). For hard removal use "
                     "recipes.magnitude or recipes.depgraph.")
  if removal in ("dpm_sp", "dpm"):
    options.setdefault("soft", True)
  if isinstance(criterion, str) and "weights_only" in _fields(CRITERIA.get(criterion, object)):
    options.setdefault("weights_only", True)  # SFP ranks filters by their weights' norm
  recipe = make("sfp", target_flops, criterion=criterion, allocation=allocation,
                schedule=schedules.Interval, removal=removal, regularizer=regularizer,
                **options)
  steps = recipe.schedule.event_steps
  gap = min((b - a for a, b in zip(steps, steps[1:])), default=None)
  decay = getattr(recipe.removal, "decay_steps", recipe.removal.settle_steps)
  if gap is not None and decay >= gap:
    raise ValueError(
        f"Invalid pruning recipe: sfp(removal={removal!r}) with decay_steps="
        f"{decay} while events are {gap} steps apart (events at "
        f"{steps}): a selection must reach zero before the next event selects afresh. "
        "Shorten decay_steps or space the events further.")
  return recipe


def psap(target_flops: float = 0.5, removal: str | Removal = "protective", *,
         criterion: str | Criterion = "l2", allocation: str | Allocation = "adaptive",
         regularizer: Regularizer | None = None, **options: Any) -> Recipe:
  """Protective Self-Adaptive Pruning (Li and Zhao 2023), our reading (its formulas are not
  public): soft pruning every ``interval`` steps from ``start_step`` and at ``end_step``;
  before each event every group's ratio is set from its own weight sparsity
  (``allocations.Adaptive``) and its lowest-L2 unprotected channels are zeroed; zeroed
  channels whose gradients pulse are restored from a backup and protected
  (``removals.Protective``). ``finalize`` makes the last selection final for surgery.
  ``removal='soft'`` is the same without protection (an ablation). Prunes a pretrained
  network or one from scratch alike."""
  if isinstance(removal, str) and removal not in ("protective", "soft"):
    raise ValueError(f"Invalid pruning recipe: psap(removal={removal!r}): PSAP prunes softly "
                     "with protective reconstruction; its removals are 'protective' and "
                     "'soft' (without protection).")
  return make("psap", target_flops, criterion=criterion, allocation=allocation,
              schedule=schedules.Interval, removal=removal, regularizer=regularizer, **options)


def gate_decorator(target_flops: float = 0.5, removal: str | Removal = "hard", *,
                   criterion: str | Criterion = "taylor",
                   allocation: str | Allocation = "global", gate_l1: float = 1e-3,
                   **options: Any) -> Recipe:
  """Gate Decorator (You et al., NeurIPS 2019): the Taylor score ``|gate * dL/dgate|`` of
  every channel's normalisation scale, accumulated over a tick and ranked globally without
  normalisation; every tick (``schedules.TickTock``) removes the least important channels
  worth ``tick_fraction`` of the remaining FLOPs until the target, never leaving a group
  below ``min_fraction`` (the reference: 0.1) of its channels; every ``ticks_per_tock``
  ticks a tock of ``tock_steps`` trains with ``gate_l1`` times L1 on the gates
  (``regularizers.GateL1``). ``removal='dpm_sp'|'dpm'`` gives DPM's +SP / +SR."""
  check_float("gate_decorator", "gate_l1", gate_l1, 0.0, float("inf"))
  if isinstance(allocation, str):
    options.setdefault("normalize", False)
    options.setdefault("min_fraction", 0.1)
  schedule = schedules.TickTock(**{k: options.pop(k) for k in list(options)
                                   if k in _fields(schedules.TickTock)})
  # The tocks' L1 acts on the gates the criterion scores.
  gates = {"gate_names": options["gate_names"]} if "gate_names" in options else {}
  return make("gate_decorator", target_flops, criterion=criterion, allocation=allocation,
              schedule=schedule, removal=removal,
              regularizer=regularizers.GateL1(strength=gate_l1, schedule=schedule, **gates),
              **options)


def otov2(target_flops: float = 0.5, removal: str | Removal = "hard", *,
          criterion: str | Criterion = "saliency", allocation: str | Allocation = "global",
          lmbda: float = 1e-3, eps: float = 0.9, **options: Any) -> Recipe:
  """OTOv2 (Chen et al., ICLR 2023), DHSPG on our channel groups (they are its
  zero-invariant groups: kernel slice, bias, normalisation scale and bias, tied across
  residual adds): at ``start_step`` (after a warm-up) the channels are partitioned by
  saliency (``criteria.Saliency``) into important and redundant ones, the redundant share
  set by the FLOPs target (``num_events`` > 1 partitions iteratively up to ``end_step``);
  redundant channels are pushed towards zero (``regularizers.HalfSpacePush`` with
  ``lmbda``) and removed when the half-space projection (``removals.HalfSpace`` with
  ``eps``) says so: at once (``removal='hard'``, the base), by a smooth decay
  (``'dpm_sp'``, +SP) or a decay with self-rectifying (``'dpm'``, +SR)."""
  if isinstance(removal, str):
    removal = removals.HalfSpace(eps=eps, then=_part("removal", removal, REMOVALS, options))
  return make("otov2", target_flops, criterion=criterion, allocation=allocation,
              schedule=schedules.Iterative, removal=removal,
              regularizer=regularizers.HalfSpacePush(lmbda=lmbda), **options)


PRESETS: Mapping[str, Callable[..., Recipe]] = {
    "depgraph": depgraph,
    "magnitude": magnitude,
    "sfp": sfp,
    "psap": psap,
    "gate_decorator": gate_decorator,
    "otov2": otov2,
}


def option_names(method: str, **names: Any) -> set[str]:
  """The options ``PRESETS[method]`` takes with the parts named in ``names`` (``criterion``,
  ``allocation``, ``removal``; the preset's defaults otherwise): the fields of its parts (and
  of parts inside them) and the preset's own keywords, for configs that hold every option
  and pass those that apply.

  >>> sorted(option_names("magnitude", removal="dpm_sp"))
  ['decay_steps', 'end_step', 'min_channels', 'min_fraction', 'num_events', 'round_to', 'soft', 'start_step', 'weights_only']
  """
  if method not in PRESETS:
    raise ValueError(f"Unknown pruning method {method!r}; choose one of {', '.join(PRESETS)}.")
  preset = PRESETS[method]
  recipe = preset(**{k: v for k, v in names.items() if v})
  out: set[str] = set()
  # The regularizer is built by the preset from its own keywords.
  todo = [recipe.criterion, recipe.allocation, recipe.schedule, recipe.removal]
  while todo:
    part = todo.pop()
    if dataclasses.is_dataclass(part) and not isinstance(part, type):
      out |= _fields(part)
      todo += [getattr(part, f) for f in _fields(part)]
  parts = {"target_flops", "removal", "criterion", "allocation", "regularizer"}
  keywords = {k for k, p in inspect.signature(preset).parameters.items()
              if p.kind == p.KEYWORD_ONLY and k not in parts}
  # round_to is the recipe's own (every preset takes it).
  return (out | keywords | {"round_to"}) - {"then"}  # a part-holding field is no option
