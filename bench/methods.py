"""The methods matrix: every base method and removal, at several budgets and seeds.

Run from the repository root:

  .venv/bin/python -m bench.methods                       # the whole matrix (hours)
  .venv/bin/python -m bench.methods --budgets 0.5 --seeds 0 --out runs/matrix-small
  .venv/bin/python -m bench.methods --methods depgraph depgraph+sr --budgets 0.1
  .venv/bin/python -m bench.methods --table-only          # the table and plots again
  .venv/bin/python -m bench.methods --table-only --out bench/results/methods --readme README.md

Every cell (dataset, method, budget, seed) is one run of the command line program with the
method's config, the budget as `--config.pruning.target_flops` and the seed as
`--config.seed` (printed, so that any cell can be run again by hand). Bases: DepGraph,
DepGraph with sparse learning, Gate Decorator and OTOv2, each as the base method (hard
removal), + SP (DPM's smooth pruning) and + SR (smooth pruning and self-rectifying); SFP and
PSAP after pretraining and from scratch. The datasets: MNIST-1D (the main benchmark) and the
8x8 digits; `--datasets cifar10` runs the papers' CIFAR-10 networks (ResNet-56, and VGG-16-BN
for Gate Decorator and OTOv2; configs/cifar10_matrix.py) for users who have the data
(`--override=--config.data_dir=/path/to/tensorflow_datasets`) and an accelerator.

Writes into `--out` (default runs/methods): `results.jsonl` (one JSON line per finished
run: the cell, accuracy right after pruning and surgery and after fine-tuning, FLOPs and
params ratios, releases, wall time; or the error that ended it), `table.md` (per dataset and
budget, mean +- standard deviation over seeds, in the shape of the papers' tables), the plots
`accuracy_vs_flops_<dataset>.png` and `finetuning_<dataset>.png`, and each run's log under
`logs/`. Cells already in `results.jsonl` are skipped, so the matrix can be run in parts and
resumed. Every run is deterministic for its seed (the same cell gives the same accuracy).
The cells of a seed share one pretraining: it runs once (pruning off) into
`pretrained/`, and each cell's workdir starts from a copy of it, which the program resumes
from exactly, so a cell's record is what its command gives in an empty workdir (`--cold`
runs every pretraining again; `wall_s` is the cell's own run, without the shared
pretraining).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, NamedTuple

ROOT = pathlib.Path(__file__).resolve().parent.parent  # The runs start from the project root.

# Method -> (the config file's name after the dataset's prefix, the row's label).
METHODS: dict[str, tuple[str, str]] = {
    "depgraph": ("hard", "DepGraph"),
    "depgraph+sp": ("dpm_sp", "DepGraph + SP"),
    "depgraph+sr": ("dpm", "DepGraph + SR (DPM)"),
    "depgraph_sl": ("depgraph_sl_hard", "DepGraph, sparse learning"),
    "depgraph_sl+sp": ("depgraph_sl_dpm_sp", "DepGraph, sparse learning + SP"),
    "depgraph_sl+sr": ("depgraph_sl_dpm", "DepGraph, sparse learning + SR (DPM)"),
    "gate_decorator": ("gate_decorator_hard", "Gate Decorator"),
    "gate_decorator+sp": ("gate_decorator_dpm_sp", "Gate Decorator + SP"),
    "gate_decorator+sr": ("gate_decorator_dpm", "Gate Decorator + SR (DPM)"),
    "otov2": ("otov2_hard", "OTOv2"),
    "otov2+sp": ("otov2_dpm_sp", "OTOv2 + SP"),
    "otov2+sr": ("otov2_dpm", "OTOv2 + SR (DPM)"),
    "sfp": ("sfp", "SFP"),
    "sfp_scratch": ("sfp_scratch", "SFP from scratch"),
    "psap": ("psap", "PSAP"),
    "psap_scratch": ("psap_scratch", "PSAP from scratch"),
}
# Dataset -> the prefix of its configs (configs/<prefix>_<method's suffix>.py), or a config
# file that takes the method as its argument (`--config=<file>:<method>`).
DATASETS = {"mnist1d": "mnist1d", "digits": "digits", "cifar10": "cifar10_matrix.py"}
BUDGETS = (0.5, 0.2, 0.1)
SEEDS = (0, 1, 2)


class Cell(NamedTuple):
  dataset: str
  method: str
  budget: float
  seed: int
  overrides: tuple[str, ...] = ()  # Further `--config.<field>=<value>` flags.
  variant: str = ""  # Names the overrides in the key, when cells differ only by them.

  @property
  def key(self) -> str:
    method = f"{self.method}@{self.variant}" if self.variant else self.method
    return f"{self.dataset}/{method}/{self.budget:g}/{self.seed}"

  @property
  def config(self) -> str:
    prefix = DATASETS[self.dataset]
    if prefix.endswith(".py"):
      return f"configs/{prefix}:{self.method}"
    return f"configs/{prefix}_{METHODS[self.method][0]}.py"

  def command(self, workdir: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "train.main", f"--config={self.config}",
            f"--workdir={workdir}", f"--config.seed={self.seed}",
            f"--config.pruning.target_flops={self.budget:g}", "--config.progress_bar=False",
            *self.overrides]


def cells(datasets, methods, budgets, seeds, overrides=()) -> list[Cell]:
  """The matrix's cells whose config exists, seeds innermost (a method's seeds together)."""
  out = []
  for dataset in datasets:
    for budget in budgets:
      for method in methods:
        for seed in seeds:
          cell = Cell(dataset, method, float(budget), int(seed), tuple(overrides))
          if (ROOT / cell.config.split(":")[0]).exists():
            out.append(cell)
  return out


def load_results(path: pathlib.Path) -> dict[str, dict[str, Any]]:
  """The finished runs in `path`, by cell key (the last line of a cell wins)."""
  if not path.exists():
    return {}
  results = {}
  for line in path.read_text().splitlines():
    if line.strip():
      record = json.loads(line)
      results[record["key"]] = record
  return results


def _load_config(config: str):
  """The ConfigDict of a `--config=` value (a file, or `file.py:argument`)."""
  import importlib  # pylint: disable=g-import-not-at-top
  path, _, argument = config.partition(":")
  module = importlib.import_module(path[:-len(".py")].replace("/", "."))
  return module.get_config(argument) if argument else module.get_config()


def pretrain_key(cell: Cell) -> str:
  """Names the pretraining a cell starts from: the same for every cell whose config, but for
  `config.pruning`, its overrides outside `config.pruning`, and its seed are the same."""
  config = _load_config(cell.config).to_dict()
  config.pop("pruning")
  outside = sorted(o for o in cell.overrides if not o.startswith("--config.pruning."))
  text = json.dumps([config, outside], sort_keys=True, default=repr)
  return f"{cell.dataset}_{hashlib.sha256(text.encode()).hexdigest()[:12]}_seed{cell.seed}"


def pretrained(cell: Cell, out: pathlib.Path) -> pathlib.Path | None:
  """A workdir holding only the pretraining of `cell` (its `pretrain/` checkpoints and their
  metrics), run once (pruning off) and shared by the cells with the same `pretrain_key`;
  None when the cell does not pretrain (pruning from scratch) or that run failed."""
  outside = [o for o in cell.overrides if not o.startswith("--config.pruning.")]
  if (_load_config(cell.config).num_epochs == 0
      and not any(o.startswith("--config.num_epochs=") for o in outside)):
    return None
  path = out / "pretrained" / pretrain_key(cell)
  if (path / "pretrain").is_dir():
    return path
  work = path.with_name(path.name + ".tmp")
  shutil.rmtree(work, ignore_errors=True)
  command = [sys.executable, "-m", "train.main", f"--config={cell.config}", f"--workdir={work}",
             f"--config.seed={cell.seed}", "--config.pruning.enabled=False",
             "--config.progress_bar=False", *outside]
  log = out / "logs" / f"pretrained_{path.name}.log"
  log.parent.mkdir(parents=True, exist_ok=True)
  with open(log, "w") as f:
    done = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False)
  if done.returncode != 0 or not (work / "pretrain").is_dir():
    shutil.rmtree(work, ignore_errors=True)
    return None
  for entry in work.iterdir():
    if entry.name not in ("pretrain", "metrics.jsonl"):
      shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
  metrics = work / "metrics.jsonl"
  lines = [line for line in metrics.read_text().splitlines()
           if line.strip() and json.loads(line)["phase"] == "pretrain"]
  metrics.write_text("".join(line + "\n" for line in lines))
  work.rename(path)
  return path


def run_cell(cell: Cell, out: pathlib.Path,
             warm_start: pathlib.Path | None = None) -> dict[str, Any]:
  """Runs one cell in a fresh workdir; returns its record.

  With `warm_start` (a workdir from `pretrained`), the workdir starts with that pretraining,
  which the run resumes from rather than running it again: the program resumes exactly, so
  the record is the one the cell's command gives in an empty workdir (without the time of
  the pretraining).
  """
  workdir = out / "work" / cell.key.replace("/", "_")
  shutil.rmtree(workdir, ignore_errors=True)  # A killed run's leftovers would be resumed.
  if warm_start is not None:
    shutil.copytree(warm_start, workdir)
  log = out / "logs" / (cell.key.replace("/", "_") + ".log")
  log.parent.mkdir(parents=True, exist_ok=True)
  command = cell.command(workdir)
  begin = time.perf_counter()
  with open(log, "w") as f:
    done = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False)
  wall = time.perf_counter() - begin
  record = {"key": cell.key, **cell._asdict(), "config": cell.config,
            "command": " ".join(command[1:]), "wall_s": round(wall, 1),
            "warm_start": warm_start is not None}
  result_file = workdir / "result.json"
  if done.returncode != 0 or not result_file.exists():
    lines = log.read_text().strip().splitlines()
    record["error"] = lines[-1] if lines else f"exit status {done.returncode}"
    return record
  result = json.loads(result_file.read_text())
  record.update({k: result[k] for k in (
      "dense_test_accuracy", "prune_test_accuracy", "surgery_test_accuracy", "test_accuracy",
      "flops_ratio", "params_ratio", "released_channels", "releases",
      "surgery_max_abs_diff", "widths")})
  shutil.rmtree(workdir, ignore_errors=True)  # Checkpoints: hundreds of runs add up.
  return record


# ----------------------------------------------------------------------------------------
# The table and the plots.


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
  if not values:
    return "-"
  mean = statistics.fmean(values) * scale
  if len(values) == 1:
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} +- {statistics.stdev(values) * scale:.{digits}f}"


def table(results: dict[str, dict[str, Any]]) -> str:
  """Markdown: per dataset and budget, a row per method, mean +- std over its seeds."""
  groups = collections.defaultdict(list)
  for r in results.values():
    groups[(r["dataset"], r["budget"], r["method"])].append(r)
  lines = []
  datasets = [d for d in DATASETS if any(k[0] == d for k in groups)]
  for dataset in datasets:
    budgets = sorted({k[1] for k in groups if k[0] == dataset}, reverse=True)
    for budget in budgets:
      lines += [f"### {dataset}, {budget:g} of the dense FLOPs", "",
                "| method | seeds | dense acc. | after pruning | fine-tuned | FLOPs left | "
                "params left | releases | wall s |",
                "|---|---|---|---|---|---|---|---|---|"]
      for method in METHODS:
        runs = groups.get((dataset, budget, method))
        if not runs:
          continue
        ok = [r for r in runs if "error" not in r]
        failed = len(runs) - len(ok)
        col = lambda k, **kw: _mean_std([r[k] for r in ok], **kw)  # noqa: E731
        seeds = f"{len(ok)}" + (f" ({failed} failed)" if failed else "")
        lines.append(
            f"| {METHODS[method][1]} | {seeds} | {col('dense_test_accuracy')} | "
            f"{col('surgery_test_accuracy')} | {col('test_accuracy')} | "
            f"{col('flops_ratio')}% | {col('params_ratio')}% | "
            f"{col('releases', scale=1.0, digits=0)} | {col('wall_s', scale=1.0, digits=0)} |")
      lines.append("")
  errors = [r for r in results.values() if "error" in r]
  if errors:
    lines += ["Runs that ended with an error:", ""]
    lines += [f"- `{r['key']}`: {r['error']}" for r in errors]
    lines.append("")
  return "\n".join(lines)


def plots(results: dict[str, dict[str, Any]], out: pathlib.Path) -> list[pathlib.Path]:
  """Accuracy against FLOPs left per method, and before/after fine-tuning, per dataset."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  written = []
  ok = [r for r in results.values() if "error" not in r]
  for dataset in DATASETS:
    runs = [r for r in ok if r["dataset"] == dataset]
    if not runs:
      continue
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for method in METHODS:
      mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["budget"])
      if not mine:
        continue
      by_budget = collections.defaultdict(list)
      for r in mine:
        by_budget[r["budget"]].append(r)
      xs = [statistics.fmean(r["flops_ratio"] for r in rs) for rs in by_budget.values()]
      ys = [statistics.fmean(r["test_accuracy"] for r in rs) for rs in by_budget.values()]
      ax.plot(xs, ys, marker="o", label=METHODS[method][1])
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs left (fraction of dense)")
    ax.set_ylabel("test accuracy, fine-tuned (mean over seeds)")
    ax.set_title(f"{dataset}: accuracy against FLOPs")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out / f"accuracy_vs_flops_{dataset}.png"
    fig.savefig(path, dpi=110)
    written.append(path)

    fig = Figure(figsize=(6, 6))
    ax = fig.subplots()
    for method in METHODS:
      mine = [r for r in runs if r["method"] == method]
      if mine:
        ax.scatter([r["surgery_test_accuracy"] for r in mine],
                   [r["test_accuracy"] for r in mine], s=12, label=METHODS[method][1])
    low = min(min(r["surgery_test_accuracy"], r["test_accuracy"]) for r in runs)
    ax.plot([low, 1], [low, 1], color="grey", linewidth=0.8)
    ax.set_xlabel("accuracy right after pruning and surgery")
    ax.set_ylabel("accuracy after fine-tuning")
    ax.set_title(f"{dataset}: what fine-tuning recovers (one point per run)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"finetuning_{dataset}.png"
    fig.savefig(path, dpi=110)
    written.append(path)
  return written


# The DPM paper's rows (what the authors published; FLOPs remaining, top-1 on CIFAR-10):
# base -> (network, dense accuracy, ((FLOPs %, accuracy) of the base, + SP, + SR)).
PUBLISHED = {
    "depgraph": ("ResNet-56", 93.53, ((47.2, 93.32), (46.7, 93.62), (47.1, 93.71))),
    "depgraph_sl": ("ResNet-56", 93.53, ((46.86, 93.84), (46.32, 93.96), (45.80, 94.13))),
    "gate_decorator": ("VGG-16", None, ((9.86, 91.50), (9.88, 91.58), (9.79, 91.74))),
    "otov2": ("VGG-16-BN", 93.2, ((26.5, 93.4), (26.4, 93.6), (25.8, 93.8))),
}


def paper_comparison(results: dict[str, dict[str, Any]], dataset: str = "mnist1d") -> str:
  """Markdown: DPM's published base / + SP / + SR accuracies (CIFAR-10) beside ours on
  `dataset` at every budget run, with our seed spread and the gains over the base."""
  groups = collections.defaultdict(list)
  for r in results.values():
    if r["dataset"] == dataset and "error" not in r and not r.get("variant"):
      groups[(r["budget"], r["method"])].append(r["test_accuracy"] * 100)
  budgets = sorted({b for b, _ in groups}, reverse=True)
  if not budgets:
    return ""
  lines = [f"### DPM's claim, published (CIFAR-10) and here ({dataset}, fine-tuned accuracy)",
           "",
           "| base method | published: base / + SP / + SR (FLOPs left) | gain + SP, + SR | "
           + " | ".join(f"here at {b:g}: base / + SP / + SR | gain + SP, + SR" for b in budgets)
           + " |",
           "|---|---|---|" + "---|---|" * len(budgets)]
  for base, (net, _, rows) in PUBLISHED.items():
    (f0, a0), (f1, a1), (f2, a2) = rows
    cells = [f"{METHODS[base][1]} | {net}: {a0:.2f} / {a1:.2f} / {a2:.2f} "
             f"({f0:g} / {f1:g} / {f2:g}%) | {a1 - a0:+.2f}, {a2 - a0:+.2f}"]
    for b in budgets:
      runs = [groups.get((b, m), []) for m in (base, f"{base}+sp", f"{base}+sr")]
      if not all(runs):
        cells.append("- | -")
        continue
      means = [statistics.fmean(v) for v in runs]
      n = min(len(v) for v in runs)
      spread = (f" (+- {max(statistics.stdev(v) for v in runs):.1f}, {n} seeds)" if n > 1
                else " (1 seed)")
      cells.append(" / ".join(f"{m:.1f}" for m in means) + spread +
                   f" | {means[1] - means[0]:+.1f}, {means[2] - means[0]:+.1f}")
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "The spread is the largest standard deviation over seeds of the three rows. "
            "PSAP published no numbers (only its abstract is public).", ""]
  return "\n".join(lines)


README_START = "<!-- methods table: generated by bench/methods.py --readme; do not edit -->"
README_END = "<!-- end of methods table -->"


def replace_between(path: pathlib.Path, start: str, end: str, body: str) -> None:
  """Writes `body` between the lines `start` and `end` of the file `path`."""
  text = path.read_text()
  if start not in text or end not in text:
    raise SystemExit(f"{path} has no table markers:\n{start}\n{end}")
  head, rest = text.split(start, 1)
  _, tail = rest.split(end, 1)
  path.write_text(f"{head}{start}\n{body}\n{end}{tail}")


def update_readme(path: pathlib.Path, results: dict[str, dict[str, Any]]) -> None:
  """Replaces the table between the README's markers with the table of `results`."""
  replace_between(path, README_START, README_END,
                  f"{paper_comparison(results)}\n{table(results)}")


def write_outputs(results: dict[str, dict[str, Any]], out: pathlib.Path) -> None:
  (out / "table.md").write_text(paper_comparison(results) + "\n" + table(results))
  plots(results, out)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--datasets", nargs="+", default=["mnist1d", "digits"],
                      choices=list(DATASETS))
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
  parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
  parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
  parser.add_argument("--out", type=pathlib.Path, default=ROOT / "runs" / "methods")
  parser.add_argument("--override", action="append", default=[], metavar="--config.F=V",
                      help="a further config flag for every run (repeatable); the results "
                           "then belong in their own --out")
  parser.add_argument("--cold", action="store_true",
                      help="run every cell's pretraining itself, rather than resuming from "
                           "the pretraining shared by the cells of its seed (same results)")
  parser.add_argument("--table-only", action="store_true",
                      help="write the table and plots from the results so far; run nothing")
  parser.add_argument("--readme", type=pathlib.Path, default=None,
                      help="also write the table into this README, between its markers")
  args = parser.parse_args(argv)
  for b in args.budgets:
    if not 0 < b <= 1:
      parser.error(f"--budgets: {b} is not a fraction of the dense FLOPs in (0, 1].")
  out = args.out.resolve()
  out.mkdir(parents=True, exist_ok=True)
  results_file = out / "results.jsonl"
  results = load_results(results_file)
  todo = [c for c in cells(args.datasets, args.methods, args.budgets, args.seeds,
                           args.override) if c.key not in results]
  if not args.table_only:
    done_before = len(results)
    print(f"{len(todo)} runs to do, {done_before} finished in {results_file}", flush=True)
    begin = time.perf_counter()
    for i, cell in enumerate(todo):
      record = run_cell(cell, out, None if args.cold else pretrained(cell, out))
      with open(results_file, "a") as f:
        f.write(json.dumps(record) + "\n")
      results[cell.key] = record
      elapsed = time.perf_counter() - begin
      left = elapsed / (i + 1) * (len(todo) - i - 1)
      outcome = (f"error: {record['error']}" if "error" in record else
                 f"after pruning {record['surgery_test_accuracy']:.3f}, fine-tuned "
                 f"{record['test_accuracy']:.3f}, FLOPs {record['flops_ratio']:.3f}")
      print(f"[{i + 1}/{len(todo)}] {cell.key} ({record['wall_s']:.0f} s): {outcome}; "
            f"about {left / 60:.0f} min left", flush=True)
      write_outputs(results, out)  # After every run: a killed matrix keeps its table.
  write_outputs(results, out)
  if args.readme is not None:
    update_readme(args.readme, results)
  print(table(results))
  print(f"Wrote {out / 'table.md'} and the plots in {out}.")


if __name__ == "__main__":
  main()
