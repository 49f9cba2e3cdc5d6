"""Benchmark: tracing, surgery, and what halving the FLOPs of ResNet-56 buys on this machine.

Run from the repository root:

  .venv/bin/python -m bench.surgery
  .venv/bin/python -m bench.surgery --batch_size=128 --repetitions=10 --calls=5 --align=8

Prints three tables for ResNet-56 (CIFAR, 32x32x3, torchvision-style initialisation):

1. ``trace_groups`` and ``remove_channels`` wall time: the first call in the process and the
   median of ``--calls`` further calls (targets: trace < 2 s, surgery < 1 s).
2. A pruned ResNet-56 at about half the MACs: every group keeps the same fraction of its
   channels (at least one), those with the largest L1 norm of their producer slices; the
   fraction is found by bisection on ``spec_cost(spec, keep).macs / dense_macs = 0.5``.
   A second pruned network does the same with kept counts in multiples of ``--align``.
3. Dense vs pruned inference (jitted, eval mode, ``--batch_size`` images, warm-up, then
   ``--repetitions`` interleaved timings of every network, median): the measured speed-up
   next to the FLOPs ratio, and the largest output difference between the pruned network
   and the masked dense one (surgery is exact: float32 round-off only).

About 35-60 s on 2 CPU cores at the defaults. CPU timings move with the machine's load (the
1-minute load average is printed); speed-ups are ratios of interleaved medians, so they move
less. On XLA:CPU the speed-up does not follow the FLOPs for odd widths: measured on a shared
2-core machine while writing this, widths [12, 23, 45] (0.53 of the FLOPs) ran 0.75-1.13x as
fast as the dense network, widths [16, 24, 40] (0.66) 1.14-1.19x, and a separate check of
widths [8, 24, 40] (0.40) and [8, 16, 32] (0.25) gave 1.5x and 2.1x. With aligned widths
(``pruned/8``, coarser steps: uniform fractions cannot land near 0.5 there) the speed-up
tracks the FLOPs ratio much better.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dpm_jax
from dpm_jax import channels
from dpm_jax import models
from dpm_jax.pruning import criteria

MODEL = "resnet56"
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
TARGET_MACS_RATIO = 0.5
BISECTION_STEPS = 30


def _seconds(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def _first_and_median(fn: Callable[[], Any], calls: int) -> tuple[float, float]:
  first = _seconds(fn)
  return first, statistics.median(_seconds(fn) for _ in range(calls))


def l1_order(spec: dpm_jax.GroupSpec, params: Any) -> list[np.ndarray]:
  """Per group, its channels by decreasing L1 norm of their producer slices."""
  ctx = dpm_jax.pruning.Context.build(spec, TARGET_MACS_RATIO)
  scores = np.asarray(jax.jit(lambda p: criteria.L1().score(ctx, None, p))(params))
  index = ctx.index
  return [np.argsort(-s, kind="stable") for s in channels.split(index, scores)]


def keep_top(order: Sequence[np.ndarray], counts: Sequence[int]) -> list[np.ndarray]:
  """Keep masks with the first ``counts[g]`` channels of ``order[g]``."""
  keep = []
  for best, count in zip(order, counts):
    k = np.zeros(len(best), bool)
    k[best[:count]] = True
    keep.append(k)
  return keep


def uniform_counts(spec: dpm_jax.GroupSpec, fraction: float, align: int = 1) -> list[int]:
  """``fraction`` of every group, rounded up to a multiple of ``align`` (at most the group)."""
  return [min(n, align * max(1, math.ceil(fraction * n / align))) for n in spec.sizes]


def fraction_for_macs(spec: dpm_jax.GroupSpec, target_ratio: float, align: int = 1) -> float:
  """The uniform kept fraction whose MACs ratio is closest to ``target_ratio``.

  MACs move in steps with the fraction (a group of 16 keeps whole channels), so bisection
  brackets the target between two steps and the closer one wins.
  """
  dense = dpm_jax.spec_cost(spec).macs
  ones = [np.arange(n) for n in spec.sizes]  # which channels does not change the MACs

  def error(fraction: float) -> float:
    keep = keep_top(ones, uniform_counts(spec, fraction, align))
    return dpm_jax.spec_cost(spec, keep).macs / dense - target_ratio

  low, high = 0.0, 1.0  # error(low) <= 0 < error(high)
  for _ in range(BISECTION_STEPS):
    mid = (low + high) / 2
    if error(mid) <= 0:
      low = mid
    else:
      high = mid
  return min((low, high), key=lambda f: abs(error(f)))


def _forward(model: nnx.Module) -> tuple[Callable[[Any, jax.Array], jax.Array], Any]:
  """The jitted eval-mode forward pass of ``model``'s graph, and its state."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)), state


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--repetitions", type=int, default=10,
                      help="interleaved timed inference calls per network")
  parser.add_argument("--calls", type=int, default=5,
                      help="warm calls of trace_groups / remove_channels for the median")
  parser.add_argument("--align", type=int, default=8,
                      help="the second pruned network keeps multiples of this many channels")
  args = parser.parse_args(argv)

  x_one = jnp.zeros((1, *IMAGE_SHAPE))
  model = models.create_model(MODEL, num_classes=NUM_CLASSES, rngs=nnx.Rngs(0))
  model.eval()

  # 1. Tracing and surgery.
  trace_first, trace_warm = _first_and_median(lambda: dpm_jax.trace_groups(model, x_one),
                                              args.calls)
  spec = dpm_jax.trace_groups(model, x_one)
  order = l1_order(spec, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  fraction = fraction_for_macs(spec, TARGET_MACS_RATIO)
  counts = uniform_counts(spec, fraction)
  keep = keep_top(order, counts)
  surgery_first, surgery_warm = _first_and_median(
      lambda: jax.tree.leaves(nnx.state(dpm_jax.remove_channels(model, spec, keep))),
      args.calls)

  print(f"{MODEL} (CIFAR, 1x{'x'.join(map(str, IMAGE_SHAPE))}), {jax.devices()[0].platform}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}\n")
  print(f"{'step':<18}{'first call':>12}{f'warm median of {args.calls}':>22}{'target':>10}")
  for name, first, warm, target in (("trace_groups", trace_first, trace_warm, "< 2 s"),
                                    ("remove_channels", surgery_first, surgery_warm, "< 1 s")):
    print(f"{name:<18}{first:>10.3f} s{warm:>20.3f} s{target:>10}")

  # 2. The pruned networks.
  aligned_fraction = fraction_for_macs(spec, TARGET_MACS_RATIO, args.align)
  aligned_counts = uniform_counts(spec, aligned_fraction, args.align)
  networks = [("dense", model, None),
              ("pruned", None, keep),
              (f"pruned/{args.align}", None, keep_top(order, aligned_counts))]
  print(f"\npruned: every group keeps its top {fraction:.3f} by L1 (at least one channel): "
        f"widths {sorted(set(counts))}")
  print(f"pruned/{args.align}: the same with counts rounded up to multiples of {args.align}, "
        f"fraction {aligned_fraction:.3f}: widths {sorted(set(aligned_counts))}")

  # 3. Inference; the dense graph also runs the masked state (surgery's reference).
  x = jax.device_put(np.random.default_rng(0).standard_normal(
      (args.batch_size, *IMAGE_SHAPE)).astype(np.float32))
  dense_cost = dpm_jax.spec_cost(spec)
  dense_fn, dense_state = _forward(model)
  rows = []
  for name, net, net_keep in networks:
    if net is None:
      net = dpm_jax.remove_channels(model, spec, net_keep)
    fn, state = _forward(net)
    for _ in range(2):  # compile, then one warm run
      fn(state, x).block_until_ready()
    exact = None
    if net_keep is not None:
      masked = jax.tree.map(lambda v: v, dense_state)  # a copy: filled in place
      nnx.replace_by_pure_dict(masked, dpm_jax.zero_channels(nnx.to_pure_dict(dense_state), spec,
                                                             net_keep))
      reference = dense_fn(masked, x)
      exact = (float(jnp.abs(fn(state, x) - reference).max()),
               float(jnp.abs(reference).max()))
    cost = dense_cost if net_keep is None else dpm_jax.spec_cost(spec, net_keep)
    rows.append((name, cost, fn, state, [], exact))
  for _ in range(args.repetitions):
    for _, _, fn, state, times, _ in rows:
      times.append(_seconds(lambda: fn(state, x)))

  print(f"\ninference: batch {args.batch_size}, jit, eval mode, median of "
        f"{args.repetitions} interleaved calls")
  print(f"{'network':<11}{'MACs/image':>12}{'params':>10}{'FLOPs ratio':>13}{'time':>12}"
        f"{'speed-up':>10}{'ideal':>8}")
  dense_ms = 1e3 * statistics.median(rows[0][4])
  for name, cost, _, _, times, _ in rows:
    ms = 1e3 * statistics.median(times)
    ratio = cost.macs / dense_cost.macs
    print(f"{name:<11}{cost.macs / 1e6:>11.2f}M{cost.params / 1e6:>9.3f}M{ratio:>13.3f}"
          f"{ms:>9.1f} ms{dense_ms / ms:>9.2f}x{1 / ratio:>7.2f}x")
  print()
  for name, _, _, _, _, exact in rows[1:]:
    print(f"{name}: max |pruned - masked dense| = {exact[0]:.1e} (outputs up to "
          f"{exact[1]:.1e}: float32 round-off)")


if __name__ == "__main__":
  main()
