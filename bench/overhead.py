"""Overhead of the pruning transform: pruning train step vs a plain optax train step.

  python -m bench.overhead                 # digits CNN and ResNet-20, this machine
  python -m bench.overhead --models resnet20 --batch 128 --reps 15

Both steps are the same jitted function (forward, backward, SGD-momentum update,
apply_updates, donated state); only the optimizer differs. Timings are interleaved in one
process (plain, then every preset in each of its regimes, repeated) and the median per-step
time is reported, with the paired ratio (each repetition over the plain step's in the same
repetition). The regimes, for every preset of ``dpm_jax.recipes.PRESETS``:

- ``idle``: before the first pruning event (the event check, the finite check);
- ``holding``: channels are pruned and held at zero (a mask multiply);
- ``decaying``: channels are decaying (smooth pruning; with self-rectifying also the gradient
  history, the release test);
- ``soft``: between two soft-pruning events (soft-pruned channels train freely: SFP);
- ``protective``: between two PSAP events (zeroed channels train; their gradient history is
  watched for pulses);
- Gate Decorator's ``tick`` (Taylor scores accumulated every step, pruned channels held) and
  ``tock`` (also L1 on the gates); OTOv2's ``pushed`` (redundant channels pushed, the
  half-space test every step); DepGraph's ``sparse learning`` (group lasso every step).

Target: paired ratio <= 1.05. The compile count of each pruning step over the whole
measurement (events, decays and releases included) is printed too; it must be 1.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import dpm_jax
from dpm_jax import models
from train.loop import apply_model, cross_entropy_loss, split_model

SHAPES = {"digits_cnn": (8, 8, 1), "resnet20": (32, 32, 3), "resnet56": (32, 32, 3)}
NEVER = 10**8
STATUS = {"active": dpm_jax.pruning.ACTIVE, "decaying": dpm_jax.pruning.DECAYING,
          "pruned": dpm_jax.pruning.PRUNED, "soft": dpm_jax.pruning.SOFT,
          "pushed": dpm_jax.pruning.PUSHED}
# Every preset, with every removal, in the regime it spends its steps in (the first event,
# where there is one, is at step 0: measured steps are after it).
_R = dpm_jax.recipes
RECIPES = {
    "depgraph idle": _R.depgraph(0.5, "dpm", start_step=NEVER),
    "depgraph hard holding": _R.depgraph(0.5, "hard"),
    "depgraph dpm_sp decaying": _R.depgraph(0.5, "dpm_sp", decay_steps=NEVER),
    "depgraph dpm decaying": _R.depgraph(0.5, "dpm", decay_steps=NEVER, min_decay_steps=1),
    "magnitude hard holding": _R.magnitude(0.5, "hard"),
    "sfp soft": _R.sfp(0.5, "soft", end_step=NEVER, interval=NEVER),
    "psap protective": _R.psap(0.5, end_step=NEVER, interval=NEVER),
    "gate_decorator tick": _R.gate_decorator(0.5, tick_steps=NEVER, end_step=NEVER),
    "gate_decorator tock": _R.gate_decorator(0.5, tick_steps=1, ticks_per_tock=1,
                                             tock_steps=NEVER, end_step=NEVER),
    "otov2 pushed": _R.otov2(0.5, eps=0.0),
    "depgraph sparse learning": _R.depgraph(0.5, start_step=NEVER, sparse_learning=True),
}


def make_step(graphdef, tx):
  def step(params, stats, opt_state, batch):
    def loss_fn(p):
      logits, new_stats = apply_model(graphdef, p, stats, batch["image"])
      return cross_entropy_loss(logits, batch["label"]), new_stats

    (loss, stats2), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats2, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1, 2))


def bench_model(name: str, batch_size: int, reps: int, steps: int) -> None:
  model = models.create_model(name, num_classes=10, rngs=nnx.Rngs(0))
  shape = SHAPES[name]
  spec = dpm_jax.trace_groups(model, jnp.zeros((1,) + shape))
  graphdefs, params, stats = split_model(model)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(batch_size,) + shape), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)}
  inner = lambda: optax.sgd(0.01, momentum=0.9)
  variants = {"plain": inner()}
  variants.update({name: dpm_jax.prune(inner(), spec, recipe)
                   for name, recipe in RECIPES.items()})
  runs = {}
  for key, tx in variants.items():
    p, s = jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, stats)
    runs[key] = [make_step(graphdefs.train, tx), p, s, tx.init(p)]
  times: dict[str, list[float]] = {k: [] for k in variants}

  def run(key: str, n: int) -> float:
    step, p, s, o = runs[key]
    start = time.perf_counter()
    for _ in range(n):
      p, s, o, loss = step(p, s, o, batch)
    loss.block_until_ready()
    runs[key][1:] = [p, s, o]
    return (time.perf_counter() - start) / n

  for key in variants:  # compile and reach the regime (first event at step 0)
    run(key, 3)
  for _ in range(reps):
    for key in variants:
      times[key].append(run(key, steps))
  plain = statistics.median(times["plain"])
  print(f"\n{name}, batch {batch_size}, {len(spec.groups)} groups, "
        f"{spec.num_channels} channels; median of {reps} x {steps} steps")
  print(f"{'step':<26} {'ms/step':>9} {'ratio':>7} {'paired':>7} {'compiles':>9}")
  for key in variants:
    med = statistics.median(times[key])
    # Paired: each repetition's time over the plain step's in the same repetition, so slow
    # drifts of the machine cancel.
    paired = statistics.median(t / p for t, p in zip(times[key], times["plain"]))
    compiles = runs[key][0]._cache_size()
    print(f"{key:<26} {1e3 * med:>9.3f} {med / plain:>7.3f} {paired:>7.3f} {compiles:>9}")
  for key in variants:
    if key != "plain":
      status = np.asarray(dpm_jax.pruning.channel_status(dpm_jax.prune_state(runs[key][3])))
      counts = {n: int((status == v).sum()) for n, v in STATUS.items() if (status == v).any()}
      print(f"  {key}: channels {counts}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["digits_cnn", "resnet20"],
                      choices=sorted(SHAPES))
  parser.add_argument("--batch", type=int, default=0,
                      help="batch size (default: 128 for digits, 32 for ResNet on CPU)")
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--steps", type=int, default=0, help="steps per repetition")
  args = parser.parse_args()
  print(f"devices: {jax.devices()}")
  for name in args.models:
    small = name == "digits_cnn"
    bench_model(name, args.batch or (128 if small else 32), args.reps,
                args.steps or (50 if small else 5))


if __name__ == "__main__":
  main()
