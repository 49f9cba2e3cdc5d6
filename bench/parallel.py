"""Step time of the data-parallel train step on 1 and on 8 devices (fake CPU devices here).

  python -m bench.parallel                         # digits CNN, 1 and 8 devices
  python -m bench.parallel --models resnet20 --devices 1 2 8 --batch 64

Each device count runs in its own process (the count of fake CPU devices is fixed when JAX
starts: ``--xla_force_host_platform_device_count``), with the training program's own step
(`train.loop.make_train_step` on a `train.parallel` mesh: the batch split over the devices,
the state replicated): a plain optax step, and a DPM step (DepGraph + DPM while channels
decay, self-rectifying on). The median time per step is printed for each, and its ratio to
1 device. On fake devices every "device" shares the same CPU cores, so 8 are not faster: the
ratio shows the cost of the partitioned program and its all-reduces, and a regression in
the sharded step shows as a jump in it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _worker(model_name: str, batch_size: int, reps: int, steps: int) -> dict[str, float]:
  """Times the steps on every device this process has; returns ms per step."""
  # pylint: disable=g-import-not-at-top  # JAX must start after XLA_FLAGS is set.
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  import dpm_jax
  from bench import overhead
  from dpm_jax import models
  from train import loop
  from train import parallel

  mesh = parallel.create_mesh((("data", -1),))
  model = models.create_model(model_name, num_classes=10, rngs=nnx.Rngs(0))
  shape = overhead.SHAPES[model_name]
  spec = dpm_jax.trace_groups(model, jnp.zeros((1,) + shape))
  graphdefs, params, stats = loop.split_model(model)
  rng = np.random.default_rng(0)
  batch = parallel.global_batch(
      {"image": rng.normal(size=(batch_size,) + shape).astype(np.float32),
       "label": rng.integers(0, 10, batch_size).astype(np.int32)}, mesh)
  inner = lambda: optax.sgd(0.01, momentum=0.9)
  variants = {"plain": inner(),
              "dpm": dpm_jax.prune(inner(), spec, overhead.RECIPES["depgraph dpm decaying"])}
  runs = {}
  for key, tx in variants.items():
    state = loop.create_train_state(jax.tree.map(jnp.copy, params),
                                    jax.tree.map(jnp.copy, stats), tx, mesh=mesh)
    runs[key] = [loop.make_train_step(graphdefs.train, tx, mesh=mesh), state]

  def run(key: str, n: int) -> float:
    step, state = runs[key]
    start = time.perf_counter()
    for _ in range(n):
      state, metrics = step(state, batch)
    metrics["loss"].block_until_ready()
    runs[key][1] = state
    return (time.perf_counter() - start) / n

  for key in variants:  # compile, and reach the decaying regime (the event at step 0)
    run(key, 3)
  times = {key: [] for key in variants}
  for _ in range(reps):
    for key in variants:
      times[key].append(run(key, steps))
  return {"devices": jax.device_count(),
          **{key: 1e3 * statistics.median(t) for key, t in times.items()}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["digits_cnn"],
                      choices=["digits_cnn", "resnet20", "resnet56"])
  parser.add_argument("--devices", nargs="+", type=int, default=[1, 8])
  parser.add_argument("--batch", type=int, default=128, help="global batch size")
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--steps", type=int, default=20, help="steps per repetition")
  parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    (name,) = args.models
    print("RESULT", json.dumps(_worker(name, args.batch, args.reps, args.steps)))
    return
  for n in args.devices:
    if args.batch % n:
      parser.error(f"--batch {args.batch} is not a multiple of {n} devices: the batch is "
                   "split evenly over them.")
  for name in args.models:
    rows = []
    for n in args.devices:
      env = dict(os.environ, JAX_PLATFORMS="cpu",
                 XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
      out = subprocess.run(
          [sys.executable, "-m", "bench.parallel", "--worker", str(n), "--models", name,
           "--batch", str(args.batch), "--reps", str(args.reps), "--steps", str(args.steps)],
          env=env, capture_output=True, text=True, check=False)
      if out.returncode:
        sys.exit(f"{name} on {n} devices failed:\n{out.stderr[-3000:]}")
      rows.append(json.loads(out.stdout.split("RESULT ", 1)[1]))
    print(f"\n{name}, global batch {args.batch}, median of {args.reps} x {args.steps} steps "
          "(fake CPU devices)")
    print(f"{'devices':>7} {'plain ms':>9} {'dpm ms':>9} {'dpm/plain':>9} "
          f"{'plain vs 1':>10} {'dpm vs 1':>9}")
    for row in rows:
      print(f"{row['devices']:>7} {row['plain']:>9.3f} {row['dpm']:>9.3f} "
            f"{row['dpm'] / row['plain']:>9.3f} {row['plain'] / rows[0]['plain']:>10.3f} "
            f"{row['dpm'] / rows[0]['dpm']:>9.3f}")


if __name__ == "__main__":
  main()
