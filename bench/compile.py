"""Compile time of the pruning train step, per preset, against the plain optax step.

  python -m bench.compile                     # digits CNN, every preset
  python -m bench.compile --models resnet20

The step is the one `bench.overhead` times (forward, backward, the optimizer, donated
state); it is lowered and compiled once per optimizer, without JAX's persistent cache, and
the seconds to lower and to compile are printed with the ratio of their sum to the plain
step's. A run pays this once per phase; a second run with the cache (`train.main` turns it
on) pays neither.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import dpm_jax
from bench.overhead import RECIPES, SHAPES, make_step
from dpm_jax import models
from train.loop import split_model


def bench_model(name: str, batch_size: int) -> None:
  model = models.create_model(name, num_classes=10, rngs=nnx.Rngs(0))
  shape = SHAPES[name]
  spec = dpm_jax.trace_groups(model, jnp.zeros((1,) + shape))
  graphdefs, params, stats = split_model(model)
  batch = {"image": jnp.zeros((batch_size,) + shape, jnp.float32),
           "label": jnp.zeros(batch_size, jnp.int32)}
  inner = lambda: optax.sgd(0.01, momentum=0.9)
  variants = {"plain": inner()}
  variants.update({key: dpm_jax.prune(inner(), spec, recipe) for key, recipe in RECIPES.items()
                   if not key.endswith(("idle", "decaying", "tock", "learning"))
                   or key == "depgraph dpm decaying"})
  print(f"\n{name}, batch {batch_size}, {len(spec.groups)} groups, {spec.num_channels} channels")
  print(f"{'step':<26} {'lower s':>8} {'compile s':>10} {'ratio':>7}")
  plain = None
  for key, tx in variants.items():
    step = make_step(graphdefs.train, tx)
    start = time.perf_counter()
    lowered = step.lower(params, stats, tx.init(params), batch)
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    total = done - start
    plain = plain or total
    print(f"{key:<26} {lowered_at - start:>8.2f} {done - lowered_at:>10.2f} "
          f"{total / plain:>7.2f}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["digits_cnn"], choices=sorted(SHAPES))
  parser.add_argument("--batch", type=int, default=128)
  args = parser.parse_args()
  jax.config.update("jax_enable_compilation_cache", False)
  print(f"devices: {jax.devices()}")
  for name in args.models:
    bench_model(name, args.batch)


if __name__ == "__main__":
  main()
