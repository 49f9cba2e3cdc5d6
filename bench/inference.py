"""Dense against pruned inference time on the device at hand, with and without channel
multiples, next to the FLOPs ratio.

  python -m bench.inference                              # ResNet-56 at 0.5 and 0.3, CPU
  python -m bench.inference --models resnet20 resnet56 --budgets 0.5 --round_to 1 8 16

Every pruned network is chosen as training would choose it at its one event: DepGraph's
global group-L2 allocation (``allocations.select_global``, scores normalised per group) on
the model's initial weights, to the budget, then, for ``round_to`` > 1, every group's width
rounded to a multiple (``allocations.round_widths``, the recipe's ``round_to``), and cut by
``remove_channels``. Inference is jitted, in eval mode, timed in interleaved calls (median);
the speed-up is the dense network's time over the pruned one's, printed next to the FLOPs
ratio (the ideal speed-up is its inverse). Measured on this 2-core CPU, ResNet-56 at batch
128: see the README.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dpm_jax
from bench.overhead import SHAPES
from bench.surgery import _forward as forward
from dpm_jax import channels
from dpm_jax import models
from dpm_jax.flops import FlopsModel
from dpm_jax.pruning import allocations


def pruned_keep(spec: dpm_jax.GroupSpec, params, budget: float, round_to: int) -> list:
  """The keep masks of a one-shot global group-L2 selection to ``budget``, rounded."""
  index = channels.ChannelIndex.build(spec)
  model = FlopsModel.build(spec)
  scores = channels.sq_norms(index, params, roles=("producer", "consumer"))
  scores = allocations.normalize(index, scores)
  k = index.num_channels
  none, everything = jnp.zeros(k, bool), jnp.ones(k, bool)
  minimum = np.ones(len(spec.groups), np.int32)
  target = jnp.float32(budget * model.dense_cost)
  selected = allocations.select_global(model, scores, everything, none, target,
                                       jnp.asarray(minimum),
                                       tolerance=0.005 * model.dense_cost)
  if round_to > 1:
    selected = allocations.round_widths(model, index, scores, everything, none, selected,
                                        target, minimum, np.full(len(spec.groups), round_to))
  return [np.asarray(~s) for s in channels.split(index, selected)]


def bench_model(name: str, budgets, multiples, batch: int, repetitions: int) -> None:
  shape = SHAPES[name]
  model = models.create_model(name, num_classes=10, rngs=nnx.Rngs(0))
  model.eval()
  spec = dpm_jax.trace_groups(model, jnp.zeros((1,) + shape))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  x = jax.device_put(np.random.default_rng(0).standard_normal((batch,) + shape)
                     .astype(np.float32))
  dense_cost = dpm_jax.spec_cost(spec)
  rows = [("dense", 1.0, forward(model), None)]
  for budget in budgets:
    for m in multiples:
      keep = pruned_keep(spec, params, budget, m)
      small = dpm_jax.remove_channels(model, spec, keep, sample=x[:2])
      ratio = dpm_jax.spec_cost(spec, keep).macs / dense_cost.macs
      rows.append((f"{budget:g} round_to={m}", ratio, forward(small),
                   sorted({int(k.sum()) for k in keep})))
  times = {label: [] for label, *_ in rows}
  for _, _, (fn, state), _ in rows:  # compile and warm up
    for _ in range(2):
      fn(state, x).block_until_ready()
  for _ in range(repetitions):
    for label, _, (fn, state), _ in rows:
      start = time.perf_counter()
      fn(state, x).block_until_ready()
      times[label].append(time.perf_counter() - start)
  dense = statistics.median(times["dense"])
  print(f"\n{name}, batch {batch}, {jax.devices()[0].platform}, load average "
        f"{os.getloadavg()[0]:.1f}; median of {repetitions} interleaved calls")
  print(f"{'network':<20}{'FLOPs ratio':>12}{'ms':>9}{'speed-up':>10}{'ideal':>8}  widths")
  for label, ratio, _, widths in rows:
    ms = statistics.median(times[label])
    print(f"{label:<20}{ratio:>12.3f}{1e3 * ms:>9.2f}{dense / ms:>10.2f}{1 / ratio:>8.2f}  "
          f"{widths or ''}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["resnet56"], choices=sorted(SHAPES))
  parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.3])
  parser.add_argument("--round_to", nargs="+", type=int, default=[1, 8])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--repetitions", type=int, default=10)
  args = parser.parse_args()
  for name in args.models:
    bench_model(name, args.budgets, args.round_to, args.batch, args.repetitions)


if __name__ == "__main__":
  main()
