"""The run report: ``report.md`` with a per-group table, and PNG plots (side effects here only).

Example:

  >>> import numpy as np, tempfile, jax.numpy as jnp
  >>> import dpm_jax
  >>> from dpm_jax import report
  >>> def mlp(v, x):
  ...   return jnp.maximum(x @ v['w1'], 0) @ v['w2']
  >>> spec = dpm_jax.trace_groups_fn(mlp, {'w1': jnp.ones((4, 8)), 'w2': jnp.ones((8, 2))},
  ...                                jnp.zeros((1, 4)))
  >>> rows = report.group_rows(spec, [np.arange(8) < 3])
  >>> rows[0]['channels_before'], rows[0]['channels_after'], rows[0]['macs_after']
  (8, 3, 18)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dpm_jax.flops import spec_cost
from dpm_jax.groups import GroupSpec
from dpm_jax.surgery import check_keep

__all__ = ["Trajectories", "group_rows", "group_ratios", "plot_trajectories", "plot_ratios",
           "plot_widths", "write_plots", "write_report"]


class Trajectories:
  """Channel norms recorded during pruning: ``steps [T]``, ``norms [T, K]``, ``status [T, K]``.

  ``released [K]`` counts releases; ``released_at [K]`` is the step of the last one.
  """

  def __init__(self, steps, norms, status, released, released_at):
    self.steps = np.asarray(steps)
    self.norms = np.asarray(norms)
    self.status = np.asarray(status)
    self.released = np.asarray(released)
    self.released_at = np.asarray(released_at)

  def save(self, path: str | os.PathLike[str]) -> None:
    """Writes an ``.npz`` at ``path`` through a temporary file: a killed writer leaves the
    previous file whole."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
      np.savez(f, steps=self.steps, norms=self.norms, status=self.status,
               released=self.released, released_at=self.released_at)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> Trajectories:
    with np.load(path) as f:
      return cls(f["steps"], f["norms"], f["status"], f["released"], f["released_at"])


def _member_params(spec: GroupSpec, g, keep: np.ndarray | None) -> int:
  """Parameters in a group's producer and consumer slices (statistics excluded)."""
  n = 0
  params = set(spec.params)
  for m in g.members:
    if m.path not in params:
      continue
    shape = spec.shape_of(m.path)
    other = int(np.prod(shape)) // shape[m.axis]
    channels = g.size if keep is None else int(keep.sum())
    n += other * channels * m.repeat
  return n


def group_rows(spec: GroupSpec, keep: Sequence[Any]) -> list[dict[str, Any]]:
  """One row per group: channels, MACs of the layers it touches, and its parameters,
  before and after pruning to ``keep``."""
  keep = check_keep(spec, keep)
  dense = spec_cost(spec)
  pruned = spec_cost(spec, keep)
  rows = []
  for gi, (g, k) in enumerate(zip(spec.groups, keep)):
    touched = [i for i, layer in enumerate(spec.layers)
               if any(t.group == gi for d in layer.dims for t in d.terms)]
    rows.append(dict(
        group=gi, name=g.name,
        channels_before=g.size, channels_after=int(k.sum()),
        macs_before=sum(dense.layers[i].macs for i in touched),
        macs_after=sum(pruned.layers[i].macs for i in touched),
        params_before=_member_params(spec, g, None),
        params_after=_member_params(spec, g, k)))
  return rows


def _figure(size: tuple[float, float]):
  """A matplotlib figure drawn off-screen, without pyplot: the caller's backend and open
  figures are left alone."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  return Figure(figsize=size)


def plot_trajectories(path: str | os.PathLike[str], traj: Trajectories,
                      title: str = "Channel norms during pruning") -> None:
  """Norm of every channel that was ever selected; released channels in red, with a marker
  at each release."""
  fig = _figure((8, 4.5))
  ax = fig.subplots()
  selected = np.nonzero((traj.status != 0).any(axis=0) | (traj.released > 0))[0]
  for c in selected:
    released = traj.released[c] > 0
    ax.plot(traj.steps, traj.norms[:, c], color="tab:red" if released else "0.6",
            lw=1.4 if released else 0.6, alpha=1.0 if released else 0.6, zorder=3 if released else 2)
    if released:
      # Every recorded decaying or soft-pruned -> active transition may be one.
      s = traj.status[:, c]
      marks = list(np.nonzero((s[:-1] != 0) & (s[1:] == 0))[0] + 1)
      if not marks:  # released between two records and selected again since
        marks = [min(np.searchsorted(traj.steps, traj.released_at[c]), len(traj.steps) - 1)]
      ax.plot(traj.steps[marks], traj.norms[marks, c], "o", color="tab:red", ms=5, zorder=4)
  ax.plot([], [], color="0.6", label="selected (decayed, zeroed or soft-pruned)")
  ax.plot([], [], "o-", color="tab:red",
          label="released (self-rectifying) or restored (protection)")
  ax.set_xlabel("optimizer step")
  ax.set_ylabel("channel norm (producer slices)")
  ax.set_title(title)
  ax.legend(loc="upper right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def group_ratios(spec: GroupSpec, traj: Trajectories) -> np.ndarray:
  """``[T, G]`` each group's share of channels selected for removal at every record."""
  starts = np.cumsum((0,) + tuple(spec.sizes[:-1]))
  removed = (traj.status != 0).astype(np.float64)
  return np.add.reduceat(removed, starts, axis=1) / np.asarray(spec.sizes) if spec.sizes else (
      np.zeros((len(traj.steps), 0)))


def plot_ratios(path: str | os.PathLike[str], spec: GroupSpec, traj: Trajectories) -> None:
  """Each group's removed share over the prune phase: how the allocation spread the cut
  (PSAP's self-adaptive ratios move at every event)."""
  fig = _figure((8, 4.5))
  ax = fig.subplots()
  ratios = group_ratios(spec, traj)
  for g, group in enumerate(spec.groups):
    ax.plot(traj.steps, ratios[:, g], lw=1.2, label=f"{g}: {group.name}"[:40])
  ax.set_xlabel("optimizer step")
  ax.set_ylabel("share of the group's channels removed")
  ax.set_ylim(0, 1)
  ax.set_title("Per-group pruning ratios")
  if len(spec.groups) <= 12:
    ax.legend(loc="upper left", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def plot_widths(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> None:
  """Channels per group before and after pruning."""
  fig = _figure((max(6, 0.45 * len(rows) + 2), 4))
  ax = fig.subplots()
  x = np.arange(len(rows))
  ax.bar(x - 0.2, [r["channels_before"] for r in rows], 0.4, label="before", color="0.7")
  ax.bar(x + 0.2, [r["channels_after"] for r in rows], 0.4, label="after", color="tab:blue")
  ax.set_xticks(x, [str(r["group"]) for r in rows])
  ax.set_xlabel("group")
  ax.set_ylabel("channels")
  ax.set_title("Widths before and after pruning")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def write_plots(workdir: str | os.PathLike[str], spec: GroupSpec, keep: Sequence[Any],
                trajectories: Trajectories | None = None) -> list[str]:
  """Draws ``widths.png`` (with trajectories also ``decay.png`` and ``ratios.png``) into
  ``workdir``; returns the report's markdown lines that show them.

  Separate from ``write_report`` so that a training program can draw them while it goes on
  (they do not depend on fine-tuning); matplotlib is used without pyplot, so a thread may.
  """
  os.makedirs(workdir, exist_ok=True)
  plot_widths(os.path.join(workdir, "widths.png"), group_rows(spec, keep))
  lines = ["", "## Plots", "", "![widths before and after](widths.png)", ""]
  if trajectories is not None and len(trajectories.steps):
    plot_trajectories(os.path.join(workdir, "decay.png"), trajectories)
    n_rel = int((trajectories.released > 0).sum())
    plot_ratios(os.path.join(workdir, "ratios.png"), spec, trajectories)
    lines += [f"Channel norms during pruning ({n_rel} channels released by self-rectifying "
              "or restored by protection, in red):", "",
              "![channel norms during decay](decay.png)", "",
              "Each group's share of removed channels over the prune phase:", "",
              "![per-group pruning ratios](ratios.png)", ""]
  return lines


def write_report(workdir: str | os.PathLike[str], spec: GroupSpec, keep: Sequence[Any], *,
                 title: str, summary: Mapping[str, Any],
                 trajectories: Trajectories | None = None,
                 plots: Sequence[str] | None = None) -> str:
  """Writes ``report.md`` (and its PNG plots) into ``workdir``; returns the report's path.

  Args:
    workdir: the run directory.
    spec: the model's groups.
    keep: the final keep masks.
    title: the report's heading.
    summary: key facts shown as a list at the top (accuracy, FLOPs, params, ...).
    trajectories: channel norms recorded during pruning, for the decay plot.
    plots: what ``write_plots`` returned for the same workdir, spec, keep and
      trajectories, when the plots are drawn already; None draws them now.
  """
  os.makedirs(workdir, exist_ok=True)
  rows = group_rows(spec, keep)
  dense, pruned = spec_cost(spec), spec_cost(spec, keep)
  lines = [f"# {title}", ""]
  lines += [f"- {k}: {v}" for k, v in summary.items()]
  lines += [
      f"- MACs: {dense.macs:,} -> {pruned.macs:,} ({pruned.macs / dense.macs:.2%} remain; "
      "FLOPs = 2 x MACs)",
      f"- params: {dense.params:,} -> {pruned.params:,} "
      f"({pruned.params / dense.params:.2%} remain)", "",
      "## Groups", "",
      "MACs are those of the layers a group feeds or produces; params those of its producer "
      "and consumer slices (a slice shared by two groups is counted in both).", "",
      "| # | group | channels before | after | MACs before | after | params before | after |",
      "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['group']} | `{r['name']}` | {r['channels_before']} | "
                 f"{r['channels_after']} | {r['macs_before']:,} | {r['macs_after']:,} | "
                 f"{r['params_before']:,} | {r['params_after']:,} |")
  lines += (list(plots) if plots is not None
            else write_plots(workdir, spec, keep, trajectories))
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path
