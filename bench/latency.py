"""A latency target against a FLOPs target: predicted and measured inference time.

  python -m bench.latency                        # ResNet-56, batch 128, 0.5 of the latency
  python -m bench.latency --budgets 0.5 0.3 --checks 8 --repetitions 15

1. Measures the network's latency table on the default device (``dpm_jax.latency``; cached
   in ``~/.cache/dpm_jax/latency``: a second run measures nothing).
2. Prunes the same initialised network at one event, as training would: DepGraph's preset
   (group-L2 scores of the initial weights, global allocation, ``round_to`` = the table's
   step), with ``target_flops`` read as a fraction of the dense network's predicted
   latency (``cost=table``), and as a fraction of its FLOPs twice: at the budget, and at the
   FLOPs the latency-targeted network kept (same FLOPs, widths chosen by FLOPs); each is cut
   by ``remove_channels``.
3. Times the dense network and the pruned ones, jitted, in interleaved calls (the fastest,
   as the table's timings), and prints for each: its FLOPs ratio, the predicted latency, the
   measured one, and for the latency target (the budget times the measured dense latency)
   the measured error against it; and the groups whose widths differ.
4. ``--checks``: as many networks with random widths on the table's grid, predicted against
   measured (how good the prediction is away from the two allocations).

Timings move with the machine's load (printed); ratios of interleaved medians move less.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import dpm_jax
from bench.overhead import SHAPES
from bench.surgery import _forward as forward
from dpm_jax import latency
from dpm_jax import models
from dpm_jax.flops import FlopsModel


def one_shot_keep(spec: dpm_jax.GroupSpec, params, budget: float, round_to: int,
                  cost) -> list[np.ndarray]:
  """The keep masks DepGraph's one-shot event leaves at ``budget`` of ``cost``."""
  recipe = dpm_jax.recipes.depgraph(target_flops=budget, round_to=round_to, cost=cost)
  tx = dpm_jax.prune(optax.sgd(0.0), spec, recipe)
  state = tx.init(params)
  _, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
  return dpm_jax.keep_masks(state)


def _flat(keep) -> jax.Array:
  return jnp.asarray(np.concatenate(keep))


def _time_all(fns, x, repetitions: int) -> list[float]:
  for fn, state in fns:  # compile and warm up
    for _ in range(2):
      fn(state, x).block_until_ready()
  times = [[] for _ in fns]
  for _ in range(repetitions):
    for t, (fn, state) in zip(times, fns):
      start = time.perf_counter()
      fn(state, x).block_until_ready()
      t.append(time.perf_counter() - start)
  return [min(t) for t in times]


def bench(name: str, budgets, batch: int, step: int, table_repeats: int, checks: int,
          repetitions: int, cache_dir: str | None) -> None:
  shape = SHAPES[name]
  model = models.create_model(name, num_classes=10, rngs=nnx.Rngs(0))
  model.eval()
  spec = dpm_jax.trace_groups(model, jnp.zeros((1,) + shape))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  start = time.perf_counter()
  table = latency.measure_latency(spec, step=step, batch=batch, repeats=table_repeats,
                                  cache_dir=cache_dir)
  took = time.perf_counter() - start
  predictor, flops = table(spec), FlopsModel.build(spec)
  x = jax.device_put(np.random.default_rng(0).standard_normal((batch,) + shape)
                     .astype(np.float32))
  sizes = np.asarray(spec.sizes)
  rows = [("dense", None, [np.ones(n, bool) for n in sizes])]
  for budget in budgets:
    by_latency = one_shot_keep(spec, params, budget, step, table)
    same = float(flops.cost(_flat(by_latency))) / flops.dense_cost
    rows += [(f"latency {budget:g}", budget, by_latency),
             (f"FLOPs {budget:g}", budget, one_shot_keep(spec, params, budget, step,
                                                         FlopsModel.build)),
             (f"FLOPs {same:.3f}", budget, one_shot_keep(spec, params, same + 1e-6, step,
                                                         FlopsModel.build))]
  rng = np.random.default_rng(1)
  for i in range(checks):
    widths = [min(n, step * int(rng.integers(1, n // step + 1))) if n > step else n
              for n in sizes]
    rows.append((f"random {i}", None, [np.arange(n) < w for n, w in zip(sizes, widths)]))
  nets = [forward(dpm_jax.remove_channels(model, spec, keep, sample=x[:2]))
          for _, _, keep in rows]
  measured = _time_all(nets, x, repetitions)
  dense_ms, dense_pred = 1e3 * measured[0], 1e3 * predictor.dense_cost
  print(f"\n{name}, batch {batch}, {jax.devices()[0].device_kind}, load average "
        f"{os.getloadavg()[0]:.1f}; latency table: step {step}, {len(table.entries)} distinct "
        f"ops, {took:.1f} s (cached: {cache_dir}); fastest of {repetitions} interleaved calls")
  print(f"{'network':<13}{'FLOPs':>7}{'pred. ms':>10}{'ratio':>7}{'meas. ms':>10}{'ratio':>7}"
        f"{'pred. err':>10}{'target ms':>11}{'vs target':>11}")
  for (label, budget, keep), ms in zip(rows, measured):
    ms *= 1e3
    pred = 1e3 * float(predictor.cost(_flat(keep)))
    ratio = float(flops.cost(_flat(keep))) / flops.dense_cost
    target = f"{budget * dense_ms:>11.1f}{100 * (ms / (budget * dense_ms) - 1):>+10.1f}%" if (
        budget is not None and label.startswith("latency")) else ""
    print(f"{label:<13}{ratio:>7.3f}{pred:>10.1f}{pred / dense_pred:>7.3f}{ms:>10.1f}"
          f"{ms / dense_ms:>7.3f}{100 * (pred / ms - 1):>+9.1f}%{target}")
  for i, (label, budget, lat) in enumerate(rows):
    if not label.startswith("latency"):
      continue
    for other, _, flo in rows[i + 1:i + 3]:
      differ = [g for g, (a, b) in enumerate(zip(lat, flo)) if a.sum() != b.sum()]
      print(f"\n{label} against {other}: {len(differ)} of {len(sizes)} group widths differ "
            "(group: latency / FLOPs)")
      print("  " + ", ".join(f"{g}: {int(lat[g].sum())}/{int(flo[g].sum())}"
                             for g in differ))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet56", choices=sorted(SHAPES))
  parser.add_argument("--budgets", nargs="+", type=float, default=[0.5])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--step", type=int, default=8)
  parser.add_argument("--table_repeats", type=int, default=5)
  parser.add_argument("--checks", type=int, default=4)
  parser.add_argument("--repetitions", type=int, default=10)
  parser.add_argument("--cache_dir", default=latency.DEFAULT_CACHE_DIR,
                      help="'' measures afresh and keeps nothing")
  args = parser.parse_args()
  bench(args.model, args.budgets, args.batch, args.step, args.table_repeats, args.checks,
        args.repetitions, args.cache_dir or None)


if __name__ == "__main__":
  main()
