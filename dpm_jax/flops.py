"""Counting multiply-accumulates (MACs), FLOPs and parameters, from the same trace as groups.

Only convolutions and dense/``dot_general`` contractions are counted, as is usual (thop,
fvcore, Torch-Pruning): BatchNorm, activations, adds and pooling are not. ``flops`` is
``2 * macs``, always: beware papers that call MACs FLOPs. Counts are for the example inputs
given (use a batch of one for per-image numbers).

Example:

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import dpm_jax
  >>> model = dpm_jax.models.create_model('resnet56', num_classes=10, rngs=nnx.Rngs(0))
  >>> report = dpm_jax.count_flops(model, jnp.zeros((1, 32, 32, 3)))
  >>> round(report.macs / 1e6)
  126
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from dpm_jax import groups as groups_lib
from dpm_jax.surgery import check_keep

__all__ = ["LayerCount", "FlopsReport", "count_flops", "count_flops_fn"]


class LayerCount(NamedTuple):
  """MACs of one convolution or contraction; ``name`` is its weight's path."""

  name: str
  primitive: str
  macs: int


@dataclasses.dataclass(frozen=True)
class FlopsReport:
  """Cost of a network: ``macs``, ``flops`` (= 2 x MACs), ``params`` and a per-layer list."""

  macs: int
  params: int
  layers: tuple[LayerCount, ...]

  @property
  def flops(self) -> int:
    """Floating-point operations: 2 x MACs (one multiply and one add each)."""
    return 2 * self.macs

  def __str__(self) -> str:
    lines = [f"{'layer':<48} {'op':<12} {'MACs':>14}"]
    lines += [f"{l.name:<48} {l.primitive:<12} {l.macs:>14,}" for l in self.layers]
    lines.append(f"total: {self.macs:,} MACs = {self.flops:,} FLOPs (2 x MACs), "
                 f"{self.params:,} params")
    return "\n".join(lines)


def _component_keep(spec, tr, comp, keep) -> np.ndarray:
  """``kept[component]`` for every component of the trace."""
  kept = np.ones(comp.max() + 1, bool)
  if keep is None:
    return kept
  for g, k in zip(spec.groups, check_keep(spec, keep)):
    m = g.members[0]
    labels = tr.param_labels[m.path][m.axis]
    kept[comp[labels[m.indices()[:, 0]]]] = k
  return kept


def _report(spec, tr, comp, keep, is_param: Callable[[groups_lib.Path], bool],
            shapes: dict) -> FlopsReport:
  kept = _component_keep(spec, tr, comp, keep)
  layers = []
  for cost in tr.costs:
    macs = cost.const
    for dim in cost.dims:
      macs *= int(kept[comp[dim]].sum())
    layers.append(LayerCount(cost.name, cost.primitive, int(macs)))
  params = 0
  for path, shape in shapes.items():
    if not is_param(path):
      continue
    labels = tr.param_labels.get(path)
    if labels is None:
      params += int(np.prod(shape))
      continue
    params += int(np.prod([kept[comp[l]].sum() if l is not None else n
                           for l, n in zip(labels, shape)]))
  return FlopsReport(sum(l.macs for l in layers), params, tuple(layers))


def count_flops_fn(apply_fn: Callable[..., Any], variables: Any, *example_inputs: Any,
                   keep: Sequence[Any] | None = None,
                   is_statistic: Callable[[groups_lib.Path], bool] =
                   groups_lib._default_is_statistic) -> FlopsReport:
  """MACs, FLOPs and parameters of ``apply_fn(variables, *example_inputs)``.

  Args:
    apply_fn, variables, example_inputs, is_statistic: as for ``trace_groups_fn``; statistics
      are not counted as parameters.
    keep: optional keep masks, one per group of ``trace_groups_fn(apply_fn, variables, ...)``:
      the counts of the pruned network, without building it.
  """
  spec, tr, comp = groups_lib._trace(apply_fn, variables, example_inputs,
                                     is_statistic=is_statistic)
  shapes = dict(spec.shapes)
  return _report(spec, tr, comp, keep, lambda p: not is_statistic(p), shapes)


def count_flops(model, *example_inputs: Any, keep: Sequence[Any] | None = None) -> FlopsReport:
  """MACs, FLOPs and ``nnx.Param`` count of an NNX module (``keep``: as if pruned)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  apply_fn, variables, is_statistic = groups_lib.nnx_apply(model)
  params = nnx.state(model, nnx.Param).to_pure_dict()
  import jax  # pylint: disable=g-import-not-at-top
  param_paths = {groups_lib.path_str(k) for k, _ in
                 jax.tree_util.tree_flatten_with_path(params)[0]}
  spec, tr, comp = groups_lib._trace(apply_fn, variables, example_inputs,
                                     is_statistic=is_statistic)
  return _report(spec, tr, comp, keep, param_paths.__contains__, dict(spec.shapes))
