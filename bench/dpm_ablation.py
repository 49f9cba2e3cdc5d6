"""DPM's own knobs, and where self-rectifying's gain comes from, on MNIST-1D.

Run from the repository root:

  .venv/bin/python -m bench.dpm_ablation                          # both studies (about 1 h)
  .venv/bin/python -m bench.dpm_ablation --study allocation --seeds 0
  .venv/bin/python -m bench.dpm_ablation --table-only --out bench/results/dpm_ablation

Two studies of DepGraph + DPM (configs/mnist1d_dpm.py) at one budget (default 0.1 of the
dense FLOPs, where the methods matrix shows + SR ahead of the base method), over seeds:

- `sensitivity`: one knob of self-rectifying at a time away from `BASELINE` (the settings
  before the study: `decay_steps`, N, one epoch; `rate_threshold`, T_rate; `len_threshold`,
  T_len; `ema_decay`; `logic`), then the defaults chosen from it together (`CHOSEN`).
- `allocation`: + SR moves channels between groups as it releases and replaces them, so its
  final widths differ from those DepGraph's global ranking picks. To separate the effect of
  those widths from the effect of the decay, DepGraph's hard removal and smooth pruning (+ SP)
  run twice each: with their own global allocation, and with the widths + SR ended at for
  the same seed (`allocation='widths'`: every group brought to + SR's final width, its least
  important channels removed, over the same events).

Every cell is one run of the command line program (the command is in `results.jsonl`), as in
`bench/methods.py`, whose runner this uses; finished cells are skipped. Writes
`results.jsonl`, `table.md` and each run's log under `logs/` into `--out` (default
runs/dpm_ablation); the cells of a seed resume from one shared pretraining
(`bench.methods.pretrained`), which gives the same results as running each command alone.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import statistics
import time
from typing import Any

from bench import methods

DATASET = "mnist1d"
METHOD = "depgraph+sr"
# Knob -> values tried; the config's own value (configs/mnist1d_dpm.py) is among them.
KNOBS: dict[str, tuple[Any, ...]] = {
    "decay_steps": (10, 20, 40, 80),
    "rate_threshold": (-0.01, 0.0, 0.01, 0.05),
    "len_threshold": (0.5, 1.0, 2.0, 4.0),
    "ema_decay": (0.5, 0.9, 0.99),
    "logic": ("and", "or"),
}
# The values the study varies one knob at a time from (set on every cell, so that each
# cell's command keeps its meaning when a default changes): the settings before the study.
BASELINE: dict[str, Any] = {"decay_steps": 40, "rate_threshold": 0.0, "len_threshold": 1.0,
                            "ema_decay": 0.9, "logic": "and"}
# The best value of each knob that did not multiply the releases (SelfRectifying's new
# ema_decay, and N of two epochs), run together as one more row.
CHOSEN: dict[str, Any] = {**BASELINE, "ema_decay": 0.5, "decay_steps": 80}
STUDIES = ("sensitivity", "allocation")


def config_values() -> dict[str, Any]:
  """The knobs' values the sensitivity study varies from (`BASELINE`)."""
  return dict(BASELINE)


def _flags(values: dict[str, Any]) -> tuple[str, ...]:
  return tuple(f"--config.pruning.{k}={v}" for k, v in values.items())


def sensitivity_cells(budget: float, seeds, defaults: dict[str, Any]) -> list[methods.Cell]:
  """The baseline's cells, then one per knob value that differs from it, then the chosen
  defaults together."""
  out = [methods.Cell(DATASET, METHOD, budget, s, _flags(defaults), "default") for s in seeds]
  for knob, values in KNOBS.items():
    for value in values:
      if value == defaults[knob]:
        continue
      out += [methods.Cell(DATASET, METHOD, budget, s, _flags({**defaults, knob: value}),
                           f"{knob}={value}") for s in seeds]
  out += [methods.Cell(DATASET, METHOD, budget, s, _flags(CHOSEN), "chosen") for s in seeds]
  return out


def widths_cell(method: str, budget: float, seed: int, widths: list[int]) -> methods.Cell:
  """`method` brought to `widths` (+ SR's, same seed) instead of its own allocation."""
  flags = ("--config.pruning.allocation=widths",
           f"--config.pruning.widths=({', '.join(map(str, widths))},)")
  return methods.Cell(DATASET, method, budget, seed, flags, "sr_widths")


def _run(cells: list[methods.Cell], results: dict[str, dict[str, Any]],
         out: pathlib.Path) -> None:
  todo = [c for c in cells if c.key not in results]
  begin = time.perf_counter()
  for i, cell in enumerate(todo):
    record = methods.run_cell(cell, out, methods.pretrained(cell, out))
    with open(out / "results.jsonl", "a") as f:
      f.write(json.dumps(record) + "\n")
    results[cell.key] = record
    left = (time.perf_counter() - begin) / (i + 1) * (len(todo) - i - 1)
    outcome = (f"error: {record['error']}" if "error" in record else
               f"after pruning {record['surgery_test_accuracy']:.3f}, fine-tuned "
               f"{record['test_accuracy']:.3f}, FLOPs {record['flops_ratio']:.3f}, "
               f"releases {record['releases']}")
    print(f"[{i + 1}/{len(todo)}] {cell.key} ({record['wall_s']:.0f} s): {outcome}; "
          f"about {left / 60:.0f} min left", flush=True)
    (out / "table.md").write_text(table(results))


def _row(label: str, runs: list[dict[str, Any]]) -> str:
  ok = [r for r in runs if "error" not in r]
  col = lambda k, **kw: methods._mean_std([r[k] for r in ok], **kw)  # noqa: E731
  failed = len(runs) - len(ok)
  seeds = f"{len(ok)}" + (f" ({failed} failed)" if failed else "")
  widths = [r["widths"] for r in ok if "widths" in r]
  widths = (" / ".join(f"{statistics.fmean(w):.0f}" for w in zip(*widths))
            if widths and len(widths) == len(ok) else "-")
  return (f"| {label} | {seeds} | {col('surgery_test_accuracy')} | {col('test_accuracy')} | "
          f"{col('flops_ratio')}% | {col('releases', scale=1.0, digits=0)} | {widths} |")


_HEAD = ["| {} | seeds | after pruning | fine-tuned | FLOPs left | releases | "
         "widths (mean) |", "|---|---|---|---|---|---|---|"]


def table(results: dict[str, dict[str, Any]]) -> str:
  """Markdown: the sensitivity rows per knob, and the allocation study."""
  by = collections.defaultdict(list)
  for r in results.values():
    by[(r["budget"], r["method"], r.get("variant", ""))].append(r)
  lines = []
  for budget in sorted({k[0] for k in by}, reverse=True):
    default = by.get((budget, METHOD, "default"), [])
    defaults = config_values()
    for knob, values in KNOBS.items():
      rows = []
      for value in values:
        runs = default if value == defaults[knob] else by.get((budget, METHOD, f"{knob}={value}"))
        if runs:
          mark = " (baseline)" if value == defaults[knob] else ""
          rows.append(_row(f"{knob}={value}{mark}", runs))
      if len(rows) > 1:
        lines += [f"### {knob}, DepGraph + DPM on {DATASET}, {budget:g} of the dense FLOPs", "",
                  _HEAD[0].format(knob), _HEAD[1], *rows, ""]
    chosen = by.get((budget, METHOD, "chosen"))
    if chosen and default:
      label = ", ".join(f"{k}={v}" for k, v in CHOSEN.items() if v != BASELINE[k])
      lines += [f"### The chosen defaults together, {DATASET}, {budget:g} of the dense FLOPs",
                "", _HEAD[0].format("setting"), _HEAD[1], _row("baseline", default),
                _row(label, chosen), ""]
    rows = []
    for method, label in (("depgraph", "DepGraph (hard)"), ("depgraph+sp", "DepGraph + SP")):
      for variant, how in (("", "its own global allocation"), ("sr_widths", "+ SR's widths")):
        runs = by.get((budget, method, variant))
        if runs:
          rows.append(_row(f"{label}, {how}", runs))
    if rows and default:
      rows.append(_row("DepGraph + SR (DPM)", default))
    if rows:
      lines += [f"### Decay or allocation: {DATASET}, {budget:g} of the dense FLOPs", "",
                _HEAD[0].format("removal, allocation"), _HEAD[1], *rows, ""]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--study", nargs="+", choices=STUDIES, default=list(STUDIES))
  parser.add_argument("--budget", type=float, default=0.1)
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--out", type=pathlib.Path, default=methods.ROOT / "runs" / "dpm_ablation")
  parser.add_argument("--table-only", action="store_true",
                      help="write the table from the results so far; run nothing")
  args = parser.parse_args(argv)
  if not 0 < args.budget <= 1:
    parser.error(f"--budget: {args.budget} is not a fraction of the dense FLOPs in (0, 1].")
  out = args.out.resolve()
  out.mkdir(parents=True, exist_ok=True)
  results = methods.load_results(out / "results.jsonl")
  if not args.table_only:
    sr = sensitivity_cells(args.budget, args.seeds, config_values())
    _run(sr[:len(args.seeds)], results, out)  # + SR as configured: both studies need it
    if "allocation" in args.study:
      cells = []
      for seed, cell in zip(args.seeds, sr):
        record = results[cell.key]
        if "error" in record:
          print(f"{cell.key} failed ({record['error']}): no widths for seed {seed}.")
          continue
        for method in ("depgraph", "depgraph+sp"):
          cells += [methods.Cell(DATASET, method, args.budget, seed),
                    widths_cell(method, args.budget, seed, record["widths"])]
      _run(cells, results, out)
    if "sensitivity" in args.study:
      _run(sr[len(args.seeds):], results, out)
  (out / "table.md").write_text(table(results))
  print(table(results))
  print(f"Wrote {out / 'table.md'}.")


if __name__ == "__main__":
  main()
