"""Schedules: when pruning events happen, and the fraction of the dense FLOPs in force.

``Iterative`` spreads ``num_events`` events evenly from ``start_step`` to ``end_step``, each a
step down towards the target (one-shot when ``num_events == 1``: DepGraph, magnitude
pruning, OTOv2's partition); ``Interval`` selects afresh every ``interval`` steps at the
target (SFP, PSAP); ``TickTock`` cuts a little at every tick until the target, with tocks
in between (Gate Decorator).

Example:

  >>> from dpm_jax.pruning import schedules
  >>> s = schedules.Iterative(start_step=0, end_step=40, num_events=5)
  >>> s.event_steps, [round(t, 2) for t in s.targets(0.5)]
  ((0, 10, 20, 30, 40), [0.9, 0.8, 0.7, 0.6, 0.5])
  >>> schedules.Interval(start_step=3, end_step=30, interval=10).event_steps
  (3, 13, 23, 30)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from dpm_jax.pruning.base import ACTIVE, Context, Schedule, State, check_float, check_int

__all__ = ["Iterative", "Interval", "TickTock"]


@dataclasses.dataclass(frozen=True)
class Iterative(Schedule):
  """``num_events`` events evenly spaced from ``start_step`` to ``end_step`` inclusive.

  Event ``i`` (0-based) brings the FLOPs to ``1 - (1 - target_flops) * (i + 1) / num_events``
  of the dense network's, so the last one meets the target.

  Attributes:
    start_step: optimizer step of the first event.
    end_step: step of the last event (default ``start_step``: one-shot).
    num_events: events from ``start_step`` to ``end_step``.
  """

  start_step: int = 0
  end_step: int | None = None
  num_events: int = 1

  def __post_init__(self):
    if self.end_step is None:
      object.__setattr__(self, "end_step", self.start_step)
    check_int("Iterative", "start_step", self.start_step, 0)
    check_int("Iterative", "end_step", self.end_step, self.start_step)
    check_int("Iterative", "num_events", self.num_events, 1)
    if self.num_events > 1 and self.end_step == self.start_step:
      raise ValueError(f"Iterative: num_events={self.num_events} needs end_step > start_step.")

  @property
  def event_steps(self) -> tuple[int, ...]:
    """The optimizer steps at which channels are selected."""
    if self.num_events == 1:
      return (self.start_step,)
    span = self.end_step - self.start_step
    return tuple(self.start_step + round(i * span / (self.num_events - 1))
                 for i in range(self.num_events))

  @property
  def last_event(self) -> int:
    return self.event_steps[-1]

  def targets(self, target_flops: float) -> tuple[float, ...]:
    """The fraction of the dense FLOPs that remains after each event."""
    return tuple(1.0 - (1.0 - target_flops) * (i + 1) / self.num_events
                 for i in range(self.num_events))

  def event(self, ctx: Context, state: State, count: jax.Array,
            status: jax.Array) -> tuple[jax.Array, jax.Array, State]:
    del status
    steps = np.asarray(self.event_steps, np.int32)
    in_force = np.asarray((1.0,) + self.targets(ctx.target_flops), np.float32)
    return jnp.any(count == steps), jnp.asarray(in_force)[jnp.sum(count >= steps)], state


@dataclasses.dataclass(frozen=True)
class Interval(Schedule):
  """An event every ``interval`` steps from ``start_step``, and a last one at ``end_step``,
  each at the final target: the selection is made afresh every time (SFP selects after every
  epoch and after the last, at its one rate).

  Attributes:
    start_step: optimizer step of the first event.
    end_step: step of the last event.
    interval: steps between events.
  """

  start_step: int = 0
  end_step: int = 0
  interval: int = 1

  def __post_init__(self):
    check_int("Interval", "start_step", self.start_step, 0)
    check_int("Interval", "end_step", self.end_step, self.start_step)
    check_int("Interval", "interval", self.interval, 1)

  @property
  def event_steps(self) -> tuple[int, ...]:
    steps = range(self.start_step, self.end_step + 1, self.interval)
    return tuple(steps) + (() if steps[-1] == self.end_step else (self.end_step,))

  @property
  def last_event(self) -> int:
    return self.end_step

  def event(self, ctx: Context, state: State, count: jax.Array,
            status: jax.Array) -> tuple[jax.Array, jax.Array, State]:
    del status
    since = count - self.start_step
    event = (since >= 0) & (count <= self.end_step) & (
        (since % self.interval == 0) | (count == self.end_step))
    target = jnp.where(since >= 0, jnp.float32(ctx.target_flops), jnp.float32(1.0))
    return event, target, state


@dataclasses.dataclass(frozen=True)
class TickTock(Schedule):
  """Gate Decorator's tick-tock (You et al. 2019): from ``start_step``, ``ticks_per_tock``
  ticks of ``tick_steps`` steps each, then a tock of ``tock_steps`` steps, repeated. Every
  tick starts with an event that removes the least important channels worth
  ``tick_fraction`` of the remaining FLOPs, until the target is met; ticks stop after
  ``end_step``. During a tock a regularizer (``regularizers.GateL1``) trains the gates
  towards sparsity (``in_tock``). Our reading: a tick's cut is a fraction of the remaining
  FLOPs (the reference code removes a fraction of the remaining filters), so that every
  tick costs the same share of what the target counts.

  Attributes:
    start_step: the step of the first tick.
    end_step: no tick after this step.
    tick_steps: steps of a tick (the reference: one epoch).
    ticks_per_tock: ticks between two tocks (the reference: 10).
    tock_steps: steps of a tock (the reference: 10 epochs); 0: no tocks.
    tick_fraction: share of the remaining FLOPs each tick removes (the reference: 0.005 of
      the filters).
  """

  start_step: int = 0
  end_step: int = 0
  tick_steps: int = 1
  ticks_per_tock: int = 10
  tock_steps: int = 0
  tick_fraction: float = 0.005

  def __post_init__(self):
    check_int("TickTock", "start_step", self.start_step, 0)
    check_int("TickTock", "end_step", self.end_step, self.start_step)
    check_int("TickTock", "tick_steps", self.tick_steps, 1)
    check_int("TickTock", "ticks_per_tock", self.ticks_per_tock, 1)
    check_int("TickTock", "tock_steps", self.tock_steps, 0)
    check_float("TickTock", "tick_fraction", self.tick_fraction, 0.0, 1.0, low_open=True,
                high_open=True)

  @property
  def last_event(self) -> int:
    return self.end_step

  @property
  def num_ticks(self) -> int:
    """How many ticks (events, while the target is not met) fit from start to end_step."""
    cycle = self.ticks_per_tock * self.tick_steps + self.tock_steps
    full, rest = divmod(self.end_step - self.start_step, cycle)
    return full * self.ticks_per_tock + min(rest // self.tick_steps + 1, self.ticks_per_tock)

  def check(self, ctx: Context) -> None:
    # Every tick removes at least tick_fraction of the remaining FLOPs, no more is sure.
    left = (1 - self.tick_fraction) ** self.num_ticks
    if left > ctx.target_flops + 1e-9:
      need = math.ceil((1 - ctx.target_flops ** (1 / self.num_ticks)) * 1e4) / 1e4
      raise ValueError(
          f"TickTock: {self.num_ticks} ticks from step {self.start_step} to end_step="
          f"{self.end_step}, each removing tick_fraction={self.tick_fraction} of the remaining "
          f"FLOPs, leave {left:.3f} of them: target_flops={ctx.target_flops} is out of reach. "
          f"Raise tick_fraction to at least {need:.4f}, or give the ticks more steps "
          "(a later end_step, fewer tock_steps).")

  def _position(self, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    since = count - self.start_step
    ticking = self.ticks_per_tock * self.tick_steps
    return since, since % (ticking + self.tock_steps)

  def in_tock(self, count: jax.Array) -> jax.Array:
    """Whether step ``count`` is in a tock."""
    since, pos = self._position(count)
    return (since >= 0) & (pos >= self.ticks_per_tock * self.tick_steps)

  def init(self, ctx: Context) -> jax.Array:
    del ctx
    return jnp.ones((), jnp.float32)  # the target in force: after the last tick

  def event(self, ctx: Context, state: jax.Array, count: jax.Array,
            status: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    since, pos = self._position(count)
    tick = ((since >= 0) & (pos < self.ticks_per_tock * self.tick_steps)
            & (pos % self.tick_steps == 0) & (count <= self.end_step))
    now = ctx.cost_of(status == ACTIVE) / ctx.dense_cost
    event = tick & (now > ctx.target_flops * (1 + 1e-6))
    next_target = jnp.maximum(ctx.target_flops, now * (1 - self.tick_fraction))
    target = jnp.where(event, next_target, state).astype(jnp.float32)
    return event, target, target
