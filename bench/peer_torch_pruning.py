"""Peer benchmark: the digits pruning job with Torch-Pruning (PyTorch) and with dpm_jax.

Run from the repository root, after `pip install -e '.[peer]'` (or `make peer`, which
installs the extra and runs it):

  .venv/bin/python -m bench.peer_torch_pruning
  .venv/bin/python -m bench.peer_torch_pruning --budgets 0.5 --seeds 0 --out runs/peer

The job is that of configs/digits_hard.py: the digits CNN pretrained for 10 epochs, pruned to
`budget` of its dense MACs by DepGraph's global group-L2 criterion in 5 events over the first
4 of 8 prune-phase epochs (hard removal), then fine-tuned for 10 epochs. Ours runs it as
`python -m train.main --config=configs/digits_hard.py`; Torch-Pruning runs the same job
written in PyTorch (`bench.peer_torch_job`, whose docstring lists what differs). Every run
is a separate process, timed from outside (imports included). Ours is run twice per budget
and seed: a first run with a fresh, empty JAX compilation cache and a cached run, the same
job again with the cache the first left. The data is prepared (and each library imported)
once before any timing.

Prints, per budget, the test accuracy, MACs and parameter ratios after pruning and the
whole-process wall time of each run kind as the median over seeds with the per-seed values,
and writes `results.jsonl` (one line per run, with each job's own breakdown of its time)
and `table.md` into `--out`; the runs' output goes to `--out`/logs.

Wall times move with the machine's load; runs are interleaved (per seed: Torch-Pruning,
ours first, ours cached) so that load changes hit all of them alike. PyTorch runs with its
default intra-op threads (one per core) unless `--torch-threads` says otherwise: on a busy
2-core machine its default ran the job 3-8x slower than one thread did (its threads wait on
each other for a CPU), so measure on a quiet machine, or give both settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, NamedTuple

ROOT = pathlib.Path(__file__).resolve().parent.parent  # The jobs run from the project root.
CONFIG = "configs/digits_hard.py"
PEER_PACKAGES = ("torch", "torch_pruning")
INSTALL_HINT = "pip install -e '.[peer]' (or make peer)"
RUNS = {"torch": "Torch-Pruning", "first": "dpm_jax, first run", "cached": "dpm_jax, cached run"}


class DigitsJob(NamedTuple):
  """The settings of the job as configs/digits_hard.py gives them, for the PyTorch job.

  tests/peer_test.py checks them against the config, so that the two jobs stay the same.
  """

  batch_size: int = 32
  num_test: int = 360  # Images in the stratified test split...
  split_seed: int = 0  # ... of `train_test_split(..., random_state=split_seed)`.
  pixel_mean: float = 0.3046  # Normalisation of pixels x * 255 // 16 / 255.
  pixel_std: float = 0.3760
  momentum: float = 0.9
  weight_decay: float = 5e-4  # Coupled L2, on conv and dense kernels only.
  pretrain_epochs: int = 10
  pretrain_lr: float = 0.05  # Cosine to 0.
  prune_epochs: int = 8
  prune_lr: float = 0.01  # Constant.
  num_events: int = 5
  first_event_epoch: int = 0
  last_event_epoch: int = 4
  finetune_epochs: int = 10
  finetune_lr: float = 0.01  # Cosine to 0.

  def event_steps(self, steps_per_epoch: int) -> tuple[int, ...]:
    """Steps of the prune phase at which channels are removed, evenly spread."""
    first = self.first_event_epoch * steps_per_epoch
    span = (self.last_event_epoch - self.first_event_epoch) * steps_per_epoch
    return tuple(first + round(i * span / (self.num_events - 1))
                 for i in range(self.num_events))

  def event_targets(self, budget: float) -> tuple[float, ...]:
    """The fraction of the dense MACs left after each event; the last is `budget`."""
    return tuple(1.0 - (1.0 - budget) * (i + 1) / self.num_events
                 for i in range(self.num_events))


JOB = DigitsJob()


def digits_arrays(job: DigitsJob = JOB) -> dict[str, tuple[Any, Any]]:
  """The train and test splits of scikit-learn's digits as dpm_jax.data yields them.

  Returns:
    {'train': (images, labels), 'test': (images, labels)}: images float32 [N, 8, 8, 1]
    (NHWC) normalised, labels int64 [N], in the order of the indices into `load_digits()`.
  """
  # Imported here: only the PyTorch job needs them, and the benchmark starts fast without.
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  label = digits.target
  train, test = model_selection.train_test_split(
      np.arange(len(label)), test_size=job.num_test, stratify=label,
      random_state=job.split_seed)
  pixels = (digits.images.astype(np.int64) * 255 // 16).astype(np.float32) / np.float32(255)
  images = ((pixels - np.float32(job.pixel_mean)) / np.float32(job.pixel_std))[..., None]
  return {name: (images[np.sort(idx)], label[np.sort(idx)].astype(np.int64))
          for name, idx in (("train", train), ("test", test))}


def check_peer_installed() -> None:
  """Exits with a message naming the install command when torch or torch_pruning is missing."""
  missing = [name for name in PEER_PACKAGES if importlib.util.find_spec(name) is None]
  if missing:
    sys.exit(f"bench.peer_torch_pruning needs {' and '.join(missing)}, which "
             f"{'is' if len(missing) == 1 else 'are'} not installed. Install the peer "
             f"extra: {INSTALL_HINT}.")


@dataclasses.dataclass
class Runner:
  """Runs the jobs as child processes of the current Python, logging into `logs`."""

  work: pathlib.Path
  logs: pathlib.Path
  data_dir: str | None
  torch_threads: int = 0

  def env(self) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # It would override the cache we give.
    return env

  def run(self, name: str, args: list[str]) -> float:
    """Runs `python args` to completion; returns its wall time in seconds."""
    log = self.logs / f"{name}.log"
    start = time.perf_counter()
    with log.open("w") as f:
      done = subprocess.run([sys.executable, *args], stdout=f, stderr=subprocess.STDOUT,
                            cwd=ROOT, env=self.env(), check=False)
    seconds = time.perf_counter() - start
    if done.returncode:
      tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
      sys.exit(f"{name} failed (exit status {done.returncode}); end of {log}:\n{tail}")
    return seconds

  def warm_up(self) -> None:
    """Prepares the digits data and imports each library once, untimed."""
    prepare = ("from dpm_jax import data; "
               f"print(data.dataset_info('digits', data_dir={self.data_dir!r}))")
    self.run("warm-up-dpm_jax", ["-c", prepare])
    self.run("warm-up-torch", ["-c", "import torch, torch_pruning, sklearn.datasets"])

  def torch(self, budget: float, seed: int) -> dict[str, Any]:
    out = self.work / f"torch-{budget}-{seed}.json"
    wall = self.run(f"torch-{budget}-{seed}", [
        "-m", "bench.peer_torch_job", f"--seed={seed}", f"--target={budget}", f"--out={out}",
        f"--threads={self.torch_threads}"])
    result = json.loads(out.read_text())
    return {**result, "wall_s": wall}

  def ours(self, budget: float, seed: int, run: str, cache: pathlib.Path) -> dict[str, Any]:
    workdir = self.work / f"ours-{run}-{budget}-{seed}"  # Fresh: a used one would resume.
    args = ["-m", "train.main", f"--config={CONFIG}", f"--workdir={workdir}",
            f"--config.seed={seed}", f"--config.pruning.target_flops={budget}",
            "--config.progress_bar=False", f"--config.compilation_cache={cache}"]
    if self.data_dir:
      args.append(f"--config.data_dir={self.data_dir}")
    wall = self.run(f"dpm_jax-{run}-{budget}-{seed}", args)
    result = json.loads((workdir / "result.json").read_text())
    arch = json.loads((workdir / "export" / "arch.json").read_text())
    return {"test_accuracy": result["test_accuracy"],
            "dense_test_accuracy": result["dense_test_accuracy"],
            "prune_test_accuracy": result["prune_test_accuracy"],
            "flops_ratio": result["flops_ratio"], "params_ratio": result["params_ratio"],
            "widths": arch["conv_widths"] + arch["dense_widths"], "wall_s": wall,
            "seconds": json.loads((workdir / "timings.json").read_text())}


def _cell(values: list[float], digits: int) -> str:
  per_seed = " ".join(f"{v:.{digits}f}" for v in values)
  return f"{statistics.median(values):.{digits}f} [{per_seed}]"


def table(records: list[dict[str, Any]], versions: dict[str, str]) -> str:
  """Markdown: per budget, one row per run kind; cells are median [per-seed values]."""
  lines = [f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}.", ""]
  for budget in sorted({r["budget"] for r in records}, reverse=True):
    rows = [r for r in records if r["budget"] == budget]
    seeds = sorted({r["seed"] for r in rows})
    lines += [f"Budget {budget:g} of the dense MACs; seeds {' '.join(map(str, seeds))}; "
              "cells: median [per seed].", "",
              "| run | test accuracy | MACs ratio | params ratio | wall s |",
              "|---|---|---|---|---|"]
    for run, label in RUNS.items():
      kind = sorted((r for r in rows if r["run"] == run), key=lambda r: r["seed"])
      if not kind:
        continue
      if run == "torch":
        label += f" ({'/'.join(sorted({str(r['torch_threads']) for r in kind}))} threads)"
      cells = [_cell([r[k] for r in kind], d) for k, d in
               (("test_accuracy", 4), ("flops_ratio", 3), ("params_ratio", 3), ("wall_s", 1))]
      lines.append(f"| {label} | {' | '.join(cells)} |")
    lines.append("")
  return "\n".join(lines)


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.2],
                      help="fractions of the dense MACs to prune to")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--out", default="runs/peer_torch_pruning",
                      help="folder for results.jsonl, table.md and the runs' logs")
  parser.add_argument("--data-dir", default=None,
                      help="TFDS data directory for ours (default: TFDS's)")
  parser.add_argument("--torch-threads", type=int, default=0,
                      help="PyTorch's intra-op threads; 0: its default (one per core)")
  parser.add_argument("--skip-torch", action="store_true", help="run ours only")
  parser.add_argument("--skip-ours", action="store_true", help="run Torch-Pruning only")
  args = parser.parse_args(argv)
  if not all(0.0 < b <= 1.0 for b in args.budgets):
    parser.error(f"--budgets {args.budgets}: each must be in (0, 1].")
  if not args.skip_torch:
    check_peer_installed()

  out = pathlib.Path(args.out).resolve()
  (out / "logs").mkdir(parents=True, exist_ok=True)
  versions = {p: _version(p) for p in ("jax", "flax", "torch", "torch-pruning")}
  records = []
  with tempfile.TemporaryDirectory(prefix="peer_torch_pruning-") as tmp:
    runner = Runner(pathlib.Path(tmp), out / "logs", args.data_dir, args.torch_threads)
    runner.warm_up()
    with (out / "results.jsonl").open("w") as results:
      for budget in args.budgets:
        for seed in args.seeds:
          runs = {}
          if not args.skip_torch:
            runs["torch"] = runner.torch(budget, seed)
          if not args.skip_ours:
            cache = pathlib.Path(tmp) / f"jax-cache-{budget}-{seed}"  # Empty: a first run.
            runs["first"] = runner.ours(budget, seed, "first", cache)
            runs["cached"] = runner.ours(budget, seed, "cached", cache)
          for run, result in runs.items():
            record = {"library": "torch_pruning" if run == "torch" else "dpm_jax", "run": run,
                      "budget": budget, "seed": seed, **result}
            results.write(json.dumps(record) + "\n")
            results.flush()
            records.append(record)
            print(f"budget {budget:g} seed {seed} {RUNS[run]}: accuracy "
                  f"{record['test_accuracy']:.4f}, MACs {record['flops_ratio']:.3f}, "
                  f"params {record['params_ratio']:.3f}, {record['wall_s']:.1f} s", flush=True)
  text = table(records, versions)
  (out / "table.md").write_text(text)
  print()
  print(text)
  print(f"Written: {out / 'results.jsonl'}, {out / 'table.md'}")


if __name__ == "__main__":
  main()
