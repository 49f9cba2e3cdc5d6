"""Pruning recipes: criterion x allocation x schedule x removal, and the published presets.

A ``Recipe`` is a frozen, validated description; ``dpm_jax.prune(inner, spec, recipe)`` runs
it. Presets reproduce the base methods; ``removal="dpm_sp"`` gives the DPM paper's "+SP" row
(smooth pruning) and ``removal="dpm"`` its "+SR" row (smooth pruning + self-rectifying).

Example:

  >>> from dpm_jax import recipes
  >>> r = recipes.depgraph(target_flops=0.5, removal="dpm", start_step=100, end_step=400)
  >>> r.criterion, r.allocation, r.removal, r.decay_steps
  ('group_l2', 'global', 'dpm', 100)
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["Recipe", "CRITERIA", "ALLOCATIONS", "REMOVALS", "depgraph", "magnitude"]

CRITERIA = ("l1", "l2", "group_l2")
ALLOCATIONS = ("global", "uniform")
REMOVALS = ("hard", "dpm_sp", "dpm")
LOGICS = ("and", "or")


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What to prune, how much, when, and how.

  Attributes:
    criterion: channel importance. ``l1`` / ``l2``: norm of the channel's producer slices
      (kernel output slice, bias, BatchNorm scale and bias); ``group_l2``: L2 over every
      member, consumers included (DepGraph).
    allocation: ``global`` ranks all channels together on importance normalised by its
      group's mean (DepGraph) and removes the least important until the FLOPs target of the
      event is met; ``uniform`` removes the same fraction of every group.
    target_flops: the fraction of the dense network's FLOPs that remains at the end (0.5
      halves the MACs). Counted from the traced layers (``dpm_jax.spec_cost``).
    min_channels: the allocation never leaves a group with fewer channels than this.
    min_fraction: ... nor with fewer than this fraction of its channels (rounded up).
    flops_tolerance: ``global`` allocation lands at most this fraction of the dense FLOPs
      under an event's target when it can: once the least important channels meet the
      target, it gives back channels and, while still further under than this, swaps a
      taken channel for a cheaper one that lands closer (our choice; DepGraph stops at the
      first channel that meets the target).
    start_step: optimizer step of the first pruning event.
    end_step: step of the last pruning event (``== start_step``: one-shot).
    num_events: pruning events from ``start_step`` to ``end_step`` inclusive; event ``i``
      (0-based) brings the FLOPs down to ``1 - (1 - target_flops) * (i + 1) / num_events``.
    removal: ``hard`` zeroes selected channels at once and holds them at zero; ``dpm_sp``
      decays them to zero over ``decay_steps`` steps (smooth pruning); ``dpm`` adds
      self-rectifying.
    decay_steps: N, the optimizer steps a selected channel takes to reach zero.
    rate_threshold: T_rate. Our reading: a decaying channel's rate is
      ``(||x~|| - ||x||) / ||x||``, how much the optimizer step grows its norm.
    len_threshold: T_len. Our reading: the channel's gradient-norm EMA divided by the mean
      gradient-norm EMA of its group's active channels.
    ema_decay: decay of the EMAs of the rate and the gradient norm (the gradient history).
    logic: ``and`` releases when both EMAs pass their thresholds, ``or`` when either does.
    min_decay_steps: a channel decays at least this many steps before it may be released.
    cooldown: steps after a release during which the channel may not be selected again.
  """

  criterion: str = "group_l2"
  allocation: str = "global"
  target_flops: float = 0.5
  min_channels: int = 1
  min_fraction: float = 0.0
  flops_tolerance: float = 0.005
  start_step: int = 0
  end_step: int = 0
  num_events: int = 1
  removal: str = "dpm"
  decay_steps: int = 100
  rate_threshold: float = 0.0
  len_threshold: float = 1.0
  ema_decay: float = 0.9
  logic: str = "and"
  min_decay_steps: int = 10
  cooldown: int = 100

  def __post_init__(self):
    def fail(msg: str):
      raise ValueError(f"Invalid pruning recipe: {msg}")

    for name, allowed in (("criterion", CRITERIA), ("allocation", ALLOCATIONS),
                          ("removal", REMOVALS), ("logic", LOGICS)):
      value = getattr(self, name)
      if value not in allowed:
        fail(f"{name}={value!r}; choose one of {', '.join(allowed)}.")
    if not 0.0 < self.target_flops <= 1.0:
      fail(f"target_flops={self.target_flops} must be in (0, 1]: it is the fraction of the "
           "dense network's FLOPs that remains (0.5 halves them).")
    if self.min_channels < 1:
      fail(f"min_channels={self.min_channels} must be at least 1 (a group may not be emptied).")
    if not 0.0 <= self.min_fraction < 1.0:
      fail(f"min_fraction={self.min_fraction} must be in [0, 1).")
    if not 0.0 <= self.flops_tolerance < 1.0:
      fail(f"flops_tolerance={self.flops_tolerance} must be in [0, 1).")
    if self.start_step < 0 or self.end_step < self.start_step:
      fail(f"need 0 <= start_step <= end_step, got start_step={self.start_step}, "
           f"end_step={self.end_step}.")
    if self.num_events < 1:
      fail(f"num_events={self.num_events} must be at least 1.")
    if self.num_events > 1 and self.end_step == self.start_step:
      fail(f"num_events={self.num_events} needs end_step > start_step.")
    if self.decay_steps < 1:
      fail(f"decay_steps={self.decay_steps} must be at least 1 (1 is hard removal).")
    if self.len_threshold < 0:
      fail(f"len_threshold={self.len_threshold} must be >= 0.")
    if not -1.0 < self.rate_threshold < 1.0:
      fail(f"rate_threshold={self.rate_threshold} must be in (-1, 1): it is a relative "
           "change of a channel's norm in one step.")
    if not 0.0 <= self.ema_decay < 1.0:
      fail(f"ema_decay={self.ema_decay} must be in [0, 1).")
    if self.min_decay_steps < 0 or self.min_decay_steps >= self.decay_steps and (
        self.removal == "dpm"):
      fail(f"min_decay_steps={self.min_decay_steps} must be in [0, decay_steps="
           f"{self.decay_steps}) for removal='dpm'.")
    if self.cooldown < 0:
      fail(f"cooldown={self.cooldown} must be >= 0.")

  @property
  def event_steps(self) -> tuple[int, ...]:
    """The optimizer steps at which channels are selected."""
    if self.num_events == 1:
      return (self.start_step,)
    span = self.end_step - self.start_step
    return tuple(self.start_step + round(i * span / (self.num_events - 1))
                 for i in range(self.num_events))

  @property
  def event_targets(self) -> tuple[float, ...]:
    """The fraction of dense FLOPs that remains after each event."""
    return tuple(1.0 - (1.0 - self.target_flops) * (i + 1) / self.num_events
                 for i in range(self.num_events))

  @property
  def last_step(self) -> int:
    """The step by which every selected channel is removed (without releases)."""
    return self.end_step + (0 if self.removal == "hard" else self.decay_steps)

  def replace(self, **changes: Any) -> Recipe:
    return dataclasses.replace(self, **changes)


def depgraph(target_flops: float = 0.5, removal: str = "hard", **overrides: Any) -> Recipe:
  """DepGraph (Fang et al. 2023): group-L2 importance over every coupled slice, ranked
  globally, removed iteratively (5 events from ``start_step`` to ``end_step``; one-shot
  when they are equal). ``removal='dpm_sp'|'dpm'`` gives DPM's +SP / +SR."""
  kw = dict(criterion="group_l2", allocation="global")
  if overrides.get("end_step", 0) > overrides.get("start_step", 0):
    kw["num_events"] = 5
  kw.update(overrides)
  return Recipe(target_flops=target_flops, removal=removal, **kw)


def magnitude(target_flops: float = 0.5, criterion: str = "l1", allocation: str = "uniform",
              removal: str = "hard", **overrides: Any) -> Recipe:
  """Magnitude pruning (Li et al. 2017, "Pruning filters for efficient convnets"): the
  filters with the smallest L1 norm, the same fraction in every layer by default."""
  return Recipe(target_flops=target_flops, criterion=criterion, allocation=allocation,
                removal=removal, **overrides)
