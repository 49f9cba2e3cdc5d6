"""Parameter surgery: physically remove pruned channels.

Given a ``GroupSpec`` and one boolean keep mask per group, slice every variable that a group
touches (params, BatchNorm statistics, every params-shaped tree inside an optimizer state) and
rebuild NNX modules with consistent feature counts. Surgery is exact when the removed channels'
producer slices are zero (see ``zero_channels``): the smaller network computes the same outputs
as the masked one.

Example:

  >>> import jax.numpy as jnp, numpy as np
  >>> from flax import nnx
  >>> import dpm_jax
  >>> model = dpm_jax.models.create_model('digits_cnn', num_classes=10, rngs=nnx.Rngs(0))
  >>> x = jnp.zeros((1, 8, 8, 1))
  >>> spec = dpm_jax.trace_groups(model, x)
  >>> keep = [np.arange(g.size) % 2 == 0 for g in spec.groups]   # keep every other channel
  >>> small = dpm_jax.remove_channels(model, spec, keep)
  >>> small.arch()['conv_widths'] == [g.size // 2 for g in spec.groups[:2]]
  True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpm_jax.groups import PRODUCER, GroupSpec, Path, path_str

__all__ = [
    "SurgeryCheckError",
    "check_keep",
    "kept_indices",
    "zero_channels",
    "remove_channels_fn",
    "remove_channels_opt_state",
    "remove_channels",
    "register_module_resizer",
]


DEFAULT_TOLERANCE = 1e-4


class SurgeryCheckError(ValueError):
  """The pruned model does not compute what the masked model computes on the sample input."""


def check_keep(spec: GroupSpec, keep: Sequence[Any]) -> list[np.ndarray]:
  """Validates keep masks against ``spec``; returns them as numpy bool arrays.

  Raises:
    ValueError: wrong number of masks, a mask that is not boolean or of the wrong length, or
      one that keeps no channel of its group (that would empty a layer).
  """
  if len(keep) != len(spec.groups):
    raise ValueError(f"Expected {len(spec.groups)} keep masks (one per group of the spec), "
                     f"got {len(keep)}.")
  out = []
  for i, (g, k) in enumerate(zip(spec.groups, keep)):
    k = np.asarray(k)
    if k.dtype != np.bool_:
      raise ValueError(
          f"Keep mask {i} (group {g.name}) has dtype {k.dtype}; keep masks are boolean, True "
          "for every channel that stays. To keep channels by index, pass "
          f"np.isin(np.arange({g.size}), indices).")
    if k.shape != (g.size,):
      raise ValueError(f"Keep mask {i} (group {g.name}) has shape {k.shape}; the group has "
                       f"{g.size} channels, so it must have shape ({g.size},).")
    if not k.any():
      raise ValueError(f"Keep mask {i} (group {g.name}) keeps no channel: that would empty "
                       "the layer. Keep at least one channel per group.")
    out.append(k)
  return out


def kept_indices(spec: GroupSpec, keep: Sequence[Any]) -> dict[tuple[Path, int], np.ndarray]:
  """For every sliced ``(path, axis)``, the sorted indices that survive surgery."""
  keep = check_keep(spec, keep)
  masks: dict[tuple[Path, int], np.ndarray] = {}
  for g, k in zip(spec.groups, keep):
    if k.all():
      continue
    for m in g.members:
      key = (m.path, m.axis)
      if key not in masks:
        masks[key] = np.ones(spec.shape_of(m.path)[m.axis], bool)
      masks[key][m.indices()[~k].ravel()] = False
  return {key: np.nonzero(mask)[0] for key, mask in masks.items()}


def _host(fn):
  """Runs ``fn`` on a host copy of a concrete array (no per-shape compiles), jnp if traced."""

  def apply(x, *args):
    if isinstance(x, jax.core.Tracer):
      return fn(jnp, x, *args)
    out = fn(np, np.asarray(x), *args)
    return out if isinstance(x, np.ndarray) else jax.device_put(out)

  return apply


@_host
def _take(xp, x, indices: dict[int, np.ndarray]):
  for axis, idx in indices.items():
    x = xp.take(x, idx, axis=axis)
  return x


@_host
def _zero(xp, x, slices: list[tuple[int, np.ndarray]]):
  for axis, idx in slices:
    mask = np.ones(x.shape[axis], bool)
    mask[idx] = False
    shape = [1] * x.ndim
    shape[axis] = -1
    x = x * xp.asarray(mask.reshape(shape), dtype=x.dtype)
  return x


def _leaf_path(key_path) -> Path:
  """A leaf's path as in the spec; an ``nnx.Variable``'s own ``value`` key is dropped.

  Optax states built from an ``nnx.State`` (``tx.init(nnx.state(model, nnx.Param))``) hold
  Variables, whose leaves sit one key below the parameter path.
  """
  if key_path and isinstance(key_path[-1], jax.tree_util.GetAttrKey) and (
      key_path[-1].name == "value"):
    key_path = key_path[:-1]
  return path_str(key_path)


def _check_shape(path: Path, x, spec_shapes: dict) -> None:
  if spec_shapes and path not in spec_shapes:
    raise ValueError(f"Variable {'/'.join(path)} is not among the variables the spec was "
                     "traced with: the spec does not match these variables. Trace the spec "
                     "from this model (and pass prefix= for a sub-tree such as 'params').")
  want = spec_shapes.get(path)
  if want is not None and tuple(np.shape(x)) != tuple(want):
    raise ValueError(f"Variable {'/'.join(path)} has shape {tuple(np.shape(x))} but the spec "
                     f"was traced with shape {tuple(want)}: the spec does not match these "
                     "variables. Trace the spec from this model.")


def _max_diff(a: Any, b: Any) -> tuple[float, float]:
  """``(max |a - b|, max |b|)`` over the leaves of two output pytrees of the same structure."""
  diff, scale = 0.0, 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape:
      return float("inf"), 0.0
    diff = max(diff, float(np.max(np.abs(x - y), initial=0.0)))
    scale = max(scale, float(np.max(np.abs(y), initial=0.0)))
  return diff, scale


def _check_surgery(run_small: Callable[[Sequence[np.ndarray]], Any], reference: Any,
                   spec: GroupSpec, keep: list[np.ndarray], tolerance: float) -> None:
  """Raises ``SurgeryCheckError`` naming the groups whose removal changes the outputs.

  ``run_small(keep)`` does surgery with ``keep`` and runs the small model on the sample;
  ``reference`` is the masked model's output. Differences are relative to the outputs'
  largest magnitude (at least 1).
  """

  def diff_of(k) -> tuple[float, str]:
    try:
      d, scale = _max_diff(run_small(k), reference)
    except Exception as e:  # pylint: disable=broad-except
      return float("inf"), f"{type(e).__name__}: {e}"
    return d / max(1.0, scale), ""

  total, error = diff_of(keep)
  if total <= tolerance:
    return
  culprits = []
  for i, (g, k) in enumerate(zip(spec.groups, keep)):
    if k.all():
      continue
    one = [k if j == i else np.ones_like(kk) for j, kk in enumerate(keep)]
    d, e = diff_of(one)
    if d > tolerance:
      culprits.append(f"group {i} ({g.name}): " + (e or f"difference {d:.3g}"))
  what = error or f"the outputs differ by {total:.3g} (relative), above {tolerance:g}"
  named = ("; ".join(culprits) if culprits else
           "no single group alone; the groups together")
  raise SurgeryCheckError(
      f"Surgery is not exact on the sample input: {what}. Removing channels of {named}. "
      "The tracer offered channels whose removal changes the model: exclude those groups "
      "with spec.without(path) and report the model, or check that the removed channels' "
      "producers are zero (dpm_jax.zero_channels) if you compare with the unmasked model.")


def remove_channels_fn(variables: Any, spec: GroupSpec, keep: Sequence[Any], *,
                       prefix: Path = (), apply_fn: Callable[..., Any] | None = None,
                       sample: Any = None, tolerance: float = DEFAULT_TOLERANCE) -> Any:
  """Slices the removed channels out of a variables pytree (pure; Linen or NNX pure dicts).

  Args:
    variables: a pytree whose leaves' key paths, after ``prefix``, are the spec's paths; it may
      hold any subset of them (params only, batch statistics only, or everything).
    spec: the ``GroupSpec`` traced from the model.
    keep: one boolean mask per group, ``True`` for channels that stay.
    prefix: prepended to each leaf path before it is looked up in the spec (e.g.
      ``('params',)`` for a params-only tree of a Linen model traced with all collections).
    apply_fn: with ``sample``, checks the surgery: ``apply_fn(variables, sample)`` (the
      masked variables, ``zero_channels`` applied) and ``apply_fn(sliced, sample)`` must agree
      within ``tolerance`` times the outputs' largest magnitude (at least 1).
    sample: an input for the check (one positional argument of ``apply_fn``).
    tolerance: the relative difference the check allows.

  Returns:
    The same tree structure with smaller leaves.

  Raises:
    ValueError: bad keep masks, or a leaf the spec was not traced with (another model, or a
      sub-tree without its ``prefix``) or of another shape.
    SurgeryCheckError: the check failed; the message names the groups at fault.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> import dpm_jax
    >>> def mlp(v, x):
    ...   return jax.nn.relu(x @ v['w1']) @ v['w2']
    >>> v = {'w1': jnp.ones((4, 8)), 'w2': jnp.ones((8, 3))}
    >>> spec = dpm_jax.trace_groups_fn(mlp, v, jnp.zeros((1, 4)))
    >>> keep = [np.arange(8) < 6]
    >>> small = dpm_jax.remove_channels_fn(v, spec, keep, apply_fn=mlp,
    ...                                    sample=jnp.ones((2, 4)))
    >>> small['w1'].shape
    (4, 6)
  """
  keep = check_keep(spec, keep)
  small = _slice_variables(variables, spec, keep, prefix)
  if sample is not None:
    if apply_fn is None:
      raise ValueError("remove_channels_fn checks surgery on sample with apply_fn: pass "
                       "apply_fn=fn, where fn(variables, sample) runs the model.")
    masked = zero_channels(variables, spec, keep, prefix=prefix)
    _check_surgery(lambda k: apply_fn(_slice_variables(variables, spec, k, prefix), sample),
                   apply_fn(masked, sample), spec, keep, tolerance)
  return small


def _slice_variables(variables: Any, spec: GroupSpec, keep: Sequence[np.ndarray],
                     prefix: Path) -> Any:
  indices = kept_indices(spec, keep)
  by_path: dict[Path, dict[int, np.ndarray]] = {}
  for (path, axis), idx in indices.items():
    by_path.setdefault(path, {})[axis] = idx
  shapes = dict(spec.shapes)

  def slice_leaf(key_path, x):
    path = tuple(prefix) + _leaf_path(key_path)
    _check_shape(path, x, shapes)
    return _take(x, by_path[path]) if path in by_path else x

  return jax.tree_util.tree_map_with_path(slice_leaf, variables)


def remove_channels_opt_state(tx: optax.GradientTransformation, opt_state: Any,
                              spec: GroupSpec, keep: Sequence[Any], *,
                              prefix: Path = ()) -> Any:
  """Slices every params-shaped tree inside ``tx``'s state (momentum, Adam moments, ...).

  ``optax.tree.map_params`` finds them, whatever the nesting (``optax.chain``,
  ``MultiSteps``, ``inject_hyperparams``, wrappers); each is sliced as ``remove_channels_fn``
  slices the params. Other leaves (counts, hyperparameters) are left as they are.

  Args:
    tx: the optimizer whose state ``opt_state`` is (for a ``dpm_jax.prune`` state after
      pruning, slice ``dpm_jax.inner_state(opt_state)`` with the inner optimizer).
    opt_state: its state.
    spec: the ``GroupSpec`` traced from the model.
    keep: one boolean mask per group, ``True`` for channels that stay.
    prefix: as for ``remove_channels_fn``.

  Example:
    >>> import optax
    >>> tx = optax.sgd(0.1, momentum=0.9)
    >>> # small_state = remove_channels_opt_state(tx, tx.init(params), spec, keep)
  """
  return optax.tree.map_params(
      tx, lambda tree: remove_channels_fn(tree, spec, keep, prefix=prefix), opt_state,
      is_leaf=lambda _: True)  # hand each params-shaped tree over whole


def zero_channels(variables: Any, spec: GroupSpec, keep: Sequence[Any], *,
                  prefix: Path = ()) -> Any:
  """Sets the producer slices of removed channels to zero (the "masked" network).

  Statistics and consumer slices are left alone: with its producers at zero a removed channel
  outputs zero, so the consumers' slices no longer matter and surgery is exact.

  Raises:
    ValueError: bad keep masks, or a leaf the spec was not traced with or of another shape
      (a spec traced from another model would zero the wrong channels).
  """
  keep = check_keep(spec, keep)
  zero: dict[Path, list[tuple[int, np.ndarray]]] = {}
  for g, k in zip(spec.groups, keep):
    if k.all():
      continue
    for m in g.members:
      if m.role == PRODUCER:
        zero.setdefault(m.path, []).append((m.axis, m.indices()[~k].ravel()))

  shapes = dict(spec.shapes)

  def zero_leaf(key_path, x):
    path = tuple(prefix) + _leaf_path(key_path)
    _check_shape(path, x, shapes)
    return _zero(x, zero[path]) if path in zero else x

  return jax.tree_util.tree_map_with_path(zero_leaf, variables)


# ----------------------------------------------------------------------------------------
# NNX modules.

_RESIZERS: dict[type, Callable[[Any], None]] = {}


def register_module_resizer(cls: type, resize: Callable[[Any], None]) -> None:
  """Teaches ``remove_channels`` how to update ``cls``'s feature counts from its arrays."""
  _RESIZERS[cls] = resize


def _resize_conv(conv) -> None:
  kernel = conv.kernel[...]
  old_in, old_out = conv.in_features, conv.out_features
  new_out = kernel.shape[-1]
  if conv.feature_group_count == old_in and old_in > 1:  # depthwise: one group per channel
    new_in = new_out * old_in // old_out
    conv.feature_group_count = new_in
  else:
    new_in = kernel.shape[-2] * conv.feature_group_count
  conv.in_features, conv.out_features = new_in, new_out
  conv.kernel_shape = tuple(kernel.shape)


def _resize_linear(linear) -> None:
  linear.in_features, linear.out_features = linear.kernel[...].shape


def _resize_norm(norm) -> None:
  for name in ("scale", "bias", "mean", "var"):
    v = getattr(norm, name, None)
    if v is not None and hasattr(v, "shape"):
      norm.num_features = v.shape[-1]
      return


def _resize_linear_general(layer) -> None:
  shape = layer.kernel[...].shape
  start = len(layer.batch_axis)
  stop = start + len(layer.in_features)
  layer.in_features, layer.out_features = tuple(shape[start:stop]), tuple(shape[stop:])


def _resize_attention(attention) -> None:
  """``nnx.MultiHeadAttention``: head counts from its projections' kernels ``(in, heads,
  head_dim)`` (``head_dim`` never changes: whole heads are removed)."""
  attention.num_heads = attention.query.kernel[...].shape[-2]
  attention.num_kv_heads = attention.key.kernel[...].shape[-2]
  attention.qkv_features = attention.num_heads * attention.head_dim


# Attributes that hold a count a module may reshape with (heads, groups): a module that has
# one and whose arrays were sliced needs a resizer, or surgery would leave the count stale.
_COUNT_ATTRIBUTES = ("num_heads", "num_kv_heads", "num_key_value_heads", "num_groups")


def _default_resizers() -> dict[type, Callable[[Any], None]]:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return {nnx.Conv: _resize_conv, nnx.Linear: _resize_linear, nnx.BatchNorm: _resize_norm,
          nnx.LayerNorm: _resize_norm, nnx.RMSNorm: _resize_norm,
          nnx.LinearGeneral: _resize_linear_general, nnx.MultiHeadAttention: _resize_attention}


def _resizer(resizers: dict[type, Callable[[Any], None]], node) -> Callable[[Any], None] | None:
  resize = next((r for cls, r in resizers.items() if type(node) is cls), None)
  return resize or next((r for cls, r in resizers.items() if isinstance(node, cls)), None)


def _eval_copy(model):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  copy = nnx.merge(*nnx.split(model))
  copy.eval()
  return copy


def _run(model, sample):
  """``model(sample)`` in eval mode, jitted: one compile instead of one per op."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(_eval_copy(model))
  return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, sample)


def remove_channels(model, spec: GroupSpec, keep: Sequence[Any], *, sample: Any = None,
                    tolerance: float = DEFAULT_TOLERANCE):
  """A new, smaller NNX module without the removed channels (the input is not changed).

  Every array a group touches is sliced and every layer's feature counts (``in_features``,
  ``out_features``, ``kernel_shape``, ``feature_group_count``, ``num_features``) are updated, so
  a zoo model's ``arch()`` describes the new widths and ``models.from_arch`` rebuilds it.

  With ``sample`` (one input of the model), surgery is checked: in eval mode, the small
  model and the masked one (``model`` with the removed channels' producers at zero) must
  agree on it within ``tolerance`` times the outputs' largest magnitude (at least 1).
  Pass one whenever you can: it turns a model the tracer misread into an error that names
  the group, instead of a wrong model.

  Raises:
    ValueError: bad keep masks, or a spec that was not traced from this model.
    TypeError: a sliced array belongs to a module type whose feature counts we cannot update
      (register one with ``register_module_resizer``).
    SurgeryCheckError: the check on ``sample`` failed; the message names the groups.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  keep = check_keep(spec, keep)
  small = _remove_channels(model, spec, keep)
  if sample is not None:
    graphdef, state = nnx.split(model)
    pure = zero_channels(nnx.to_pure_dict(state), spec, keep)
    nnx.replace_by_pure_dict(state, pure)
    masked = nnx.merge(graphdef, state)
    _check_surgery(lambda k: _run(_remove_channels(masked, spec, k), sample),
                   _run(masked, sample), spec, keep, tolerance)
  return small


def _remove_channels(model, spec: GroupSpec, keep: list[np.ndarray]):
  from flax import nnx  # pylint: disable=g-import-not-at-top

  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  have = {path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(pure)[0]}
  missing = sorted("/".join(p) for p, _ in spec.shapes if p not in have)
  if missing:
    raise ValueError(f"The spec was traced with variables this model does not have "
                     f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): it "
                     "does not match this model. Trace the spec from this model.")
  sliced = remove_channels_fn(pure, spec, keep)
  new_state = jax.tree.map(lambda x: x, state)
  nnx.replace_by_pure_dict(new_state, sliced)
  new_model = nnx.merge(graphdef, new_state)
  touched = {path[:-1] for (path, _) in kept_indices(spec, keep)}
  # Modules above the sliced ones may hold counts of what was removed (an attention
  # module's head counts, over its projections): their resizers run too.
  above = {path[:i] for path in touched for i in range(len(path))}
  resizers = {**_default_resizers(), **_RESIZERS}
  for node_path, node in nnx.iter_graph(new_model):
    node_path = tuple(map(str, node_path))
    if not isinstance(node, nnx.Module) or node_path not in touched | above:
      continue
    resize = _resizer(resizers, node)
    where = "/".join(node_path) or "the top"
    if resize is None and node_path in touched:
      raise TypeError(f"Cannot update the feature counts of {type(node).__name__} at "
                      f"{where} after slicing its arrays; register a resizer with "
                      "dpm_jax.register_module_resizer.")
    counts = [a for a in _COUNT_ATTRIBUTES if isinstance(vars(node).get(a), int)]
    if resize is None and counts:
      raise TypeError(f"{type(node).__name__} at {where} holds {', '.join(counts)}, which "
                      "surgery may have changed under it: register a resizer with "
                      "dpm_jax.register_module_resizer that sets them from the arrays, or "
                      "read them from the arrays' shapes.")
    if resize is not None:
      resize(node)
  return new_model
