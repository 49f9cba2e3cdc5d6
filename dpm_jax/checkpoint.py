"""Checkpoints with orbax: train states, and the model architecture beside them.

Each training phase checkpoints into its own directory with an orbax
`CheckpointManager`; the architecture (`model.arch()`, JSON) is written next to
the step directories so that a (possibly pruned) model can be rebuilt without
the code that trained it::

  workdir/pretrain/arch.json
  workdir/pretrain/<step>/...

An exported model also holds `inference.jax_export`: its inference function serialized with
`jax.export` (StableHLO, weights included, any batch size), which runs with `jax` alone::

  exported = jax.export.deserialize(open('export/inference.jax_export', 'rb').read())
  logits = exported.call(images)

Restores always go into an abstract target (`jax.ShapeDtypeStruct` leaves), so
the restored tree has the target's structure, dtypes and shardings. Failures to
read a checkpoint are re-raised as `CheckpointError` naming the directory and
what to do about it.
"""

from collections.abc import Mapping
import json
import os
from typing import Any, TypeVar

from etils import epath
from flax import nnx
import jax
import orbax.checkpoint as ocp

from dpm_jax import models

PyTree = Any
T = TypeVar('T')

ARCH_FILENAME = 'arch.json'
INFERENCE_FILENAME = 'inference.jax_export'
# Platforms the exported inference function is lowered for: it runs on any of them.
EXPORT_PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be read into the requested target."""


def create_manager(
    directory: str | os.PathLike[str], *, max_to_keep: int | None = 3, save_interval_steps: int = 1
) -> ocp.CheckpointManager:
  """Returns a `CheckpointManager` for `directory` (created if missing).

  Args:
    directory: where step directories are written (a relative path is made absolute, as
      orbax requires).
    max_to_keep: keep only this many most recent checkpoints (None: all).
    save_interval_steps: `save` without `force` writes only at multiples of it.
  """
  directory = epath.Path(os.path.abspath(os.fspath(directory)))
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True
  )
  try:
    return ocp.CheckpointManager(
        directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
    )
  except Exception as e:  # orbax reads step metadata here; any failure means a bad directory.
    raise CheckpointError(_unreadable_message(directory, None, e)) from e


def abstract(tree: PyTree) -> PyTree:
  """The `jax.ShapeDtypeStruct` tree (with shardings) of a tree of arrays."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def save(manager: ocp.CheckpointManager, step: int, state: PyTree, *, force: bool = False) -> bool:
  """Saves `state` at `step`; returns whether a checkpoint was written.

  The device-to-host copy is synchronous, so `state` may be donated right after.
  """
  return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def restore(manager: ocp.CheckpointManager, target: T, *, step: int | None = None) -> T:
  """Restores the checkpoint at `step` (default: latest) with the structure of `target`.

  Args:
    manager: the manager of the checkpoint directory.
    target: a tree of arrays or `jax.ShapeDtypeStruct`s giving structure, shapes,
      dtypes and shardings of the result.
    step: which checkpoint; the latest one when None.

  Returns:
    The restored tree.

  Raises:
    FileNotFoundError: there is no checkpoint in the directory.
    CheckpointError: the checkpoint is corrupt or does not match `target`.
  """
  if step is None:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {manager.directory}.')
  try:
    stored = manager.item_metadata(step)
    if stored is not None:  # Compared up front: orbax's own error does not name the leaf.
      mismatch = _mismatch(_leaf_specs(stored.tree), _leaf_specs(target))
      if mismatch:
        raise ValueError(f'the checkpoint does not match the state to restore: {mismatch}')
    return manager.restore(step, args=ocp.args.StandardRestore(abstract(target)))
  except Exception as e:
    raise CheckpointError(_unreadable_message(manager.directory, step, e)) from e


def restore_latest(manager: ocp.CheckpointManager, target: T) -> T | None:
  """Like `restore` for the latest checkpoint, or None when there is none."""
  if manager.latest_step() is None:
    return None
  return restore(manager, target)


def save_arch(directory: str | os.PathLike[str], arch: Mapping[str, Any]) -> None:
  """Writes `arch` as JSON into `directory`, or checks that it matches the one there.

  In a run of several processes, process 0 writes it (and the others do nothing), as orbax
  writes a checkpoint's metadata.

  Raises:
    ValueError: `directory` already holds a different architecture (the
      checkpoints there belong to another model).
  """
  if jax.process_index() != 0:
    return
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / ARCH_FILENAME
  # A JSON round trip normalises tuples to lists, so equal architectures compare equal.
  arch = json.loads(json.dumps(arch))
  if path.exists():
    existing = load_arch(directory)
    if existing != arch:
      raise ValueError(
          f'{path} describes a different model than this run:\n  saved: {existing}\n'
          f'  now:   {arch}\nUse a new workdir, or delete {directory} to start this phase over.'
      )
    return
  tmp = directory / (ARCH_FILENAME + '.tmp')
  tmp.write_text(json.dumps(arch, indent=2, sort_keys=True))
  tmp.rename(path)


def load_arch(directory: str | os.PathLike[str]) -> dict[str, Any]:
  """Reads the architecture JSON written by `save_arch`."""
  path = epath.Path(directory) / ARCH_FILENAME
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(
        f'{path} is not valid JSON ({e}). Delete {path.parent} or use a new workdir.'
    ) from e


def export_model(
    directory: str | os.PathLike[str], arch: Mapping[str, Any], params: PyTree, batch_stats: PyTree
) -> None:
  """Writes a model for `load_model`: its architecture and variables, no optimizer state.

  The layout is that of a phase directory (`arch.json` and a step directory, here
  step 0) holding only {'params', 'batch_stats'}; exporting again replaces it. In a run of
  several processes every process calls it (orbax writes the checkpoint together).
  """
  directory = epath.Path(directory)
  if jax.process_index() == 0 and (directory / ARCH_FILENAME).exists():
    (directory / ARCH_FILENAME).unlink()  # A re-export may follow a change of architecture.
  save_arch(directory, arch)
  manager = create_manager(directory, max_to_keep=1)
  try:
    if 0 in manager.all_steps():
      manager.delete(0)
    save(manager, 0, {'params': params, 'batch_stats': batch_stats}, force=True)
    manager.wait_until_finished()
  finally:
    manager.close()


def serialize_inference(
    arch: Mapping[str, Any],
    params: PyTree,
    batch_stats: PyTree,
    example: jax.ShapeDtypeStruct | jax.Array,
    *,
    platforms: tuple[str, ...] = EXPORT_PLATFORMS,
) -> bytes:
  """The model's eval-mode forward pass as a `jax.export` serialization.

  The function maps images of `example`'s shape and dtype, with any number of rows (the
  batch dimension is symbolic), to logits; the weights are constants inside it, so running
  it needs neither this library nor flax nor the model's code, only `jax`.

  Args:
    arch: the model's `arch()`.
    params: its `nnx.Param` values, as a pure dict.
    batch_stats: its `nnx.BatchStat` values, as a pure dict.
    example: one batch of inputs (or its shape and dtype); its first dimension is ignored.
    platforms: what the function is lowered for; it runs on any of them.

  Returns:
    Bytes for `jax.export.deserialize`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> model = models.create_model('digits_cnn', num_classes=10, rngs=nnx.Rngs(0))
    >>> _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    >>> blob = serialize_inference(model.arch(), nnx.to_pure_dict(params),
    ...                            nnx.to_pure_dict(stats), jnp.zeros((1, 8, 8, 1)))
    >>> jax.export.deserialize(blob).call(jnp.zeros((3, 8, 8, 1))).shape
    (3, 10)
  """
  abstract_model = nnx.eval_shape(lambda: models.from_arch(arch, rngs=nnx.Rngs(0)))
  graphdef, _, _, rest = nnx.split(abstract_model, nnx.Param, nnx.BatchStat, ...)
  model = nnx.merge(graphdef, params, batch_stats, rest, copy=True)
  model.eval()
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda images: nnx.merge(graphdef, state)(images))
  batch = jax.export.symbolic_shape('batch')
  shape = jax.ShapeDtypeStruct((*batch, *example.shape[1:]), example.dtype)
  return jax.export.export(forward, platforms=platforms)(shape).serialize()


def export_inference(
    directory: str | os.PathLike[str],
    arch: Mapping[str, Any],
    params: PyTree,
    batch_stats: PyTree,
    example: jax.ShapeDtypeStruct | jax.Array,
) -> epath.Path:
  """Writes `serialize_inference(...)` to `directory/inference.jax_export`; returns its path.

  The arrays must be this process's own (e.g. gathered from a run over several).
  """
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / INFERENCE_FILENAME
  tmp = directory / (INFERENCE_FILENAME + '.tmp')
  tmp.write_bytes(serialize_inference(arch, params, batch_stats, example))
  tmp.replace(path)
  return path


def load_model(directory: str | os.PathLike[str], *, step: int | None = None) -> nnx.Module:
  """Rebuilds a trained model from `arch.json` and a checkpoint's params and batch stats.

  Only the `params` and `batch_stats` entries of the checkpoint are read, so the
  optimizer (or pruning) state and code are not needed.

  Args:
    directory: a phase directory written by training, or one written by
      `export_model`.
    step: which checkpoint; the latest one when None.

  Returns:
    The model, in eval mode, with its arrays on the first local device.
  """
  directory = epath.Path(os.path.abspath(os.fspath(directory)))
  arch = load_arch(directory)
  abstract_model = nnx.eval_shape(lambda: models.from_arch(arch, rngs=nnx.Rngs(0)))
  graphdef, params, batch_stats, rest = nnx.split(abstract_model, nnx.Param, nnx.BatchStat, ...)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      {'params': nnx.to_pure_dict(params), 'batch_stats': nnx.to_pure_dict(batch_stats)},
  )
  # A fresh read-only manager has no handler bound yet, so it reads the
  # StandardSave-written item with the (format-compatible) PyTree handler,
  # which can restore a part of the tree.
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    if step is None:
      step = manager.latest_step()
      if step is None:
        raise FileNotFoundError(f'No checkpoint in {directory}.')
    try:
      restored = manager.restore(
          step,
          args=ocp.args.PyTreeRestore(
              item=target,
              restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True,
          ),
      )
    except Exception as e:
      raise CheckpointError(_unreadable_message(directory, step, e)) from e
  finally:
    manager.close()
  model = nnx.merge(graphdef, restored['params'], restored['batch_stats'], rest)
  model.eval()
  return model


def _leaf_specs(tree: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
  """'/'-joined key path -> (shape, dtype) of each leaf of a state or of its metadata."""

  def name(key: Any) -> str:
    for attr in ('key', 'name', 'idx'):  # DictKey, GetAttrKey (NamedTuple), SequenceKey.
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)

  return {
      '/'.join(map(name, path)): (getattr(leaf, 'shape', None), str(getattr(leaf, 'dtype', None)))
      for path, leaf in jax.tree.leaves_with_path(tree)
  }


def _mismatch(stored: dict[str, Any], wanted: dict[str, Any], limit: int = 5) -> str:
  """A description of how two `_leaf_specs` differ ('' when they do not)."""
  problems = [f'missing from the checkpoint: {p}' for p in sorted(wanted.keys() - stored.keys())]
  problems += [f'not in the state: {p}' for p in sorted(stored.keys() - wanted.keys())]
  problems += [
      f'{p}: {stored[p][0]} {stored[p][1]} in the checkpoint, {wanted[p][0]} {wanted[p][1]} wanted'
      for p in sorted(stored.keys() & wanted.keys())
      if stored[p] != wanted[p]
  ]
  more = f' (and {len(problems) - limit} more)' if len(problems) > limit else ''
  return '; '.join(problems[:limit]) + more


def _unreadable_message(directory: epath.Path, step: int | None, error: Exception) -> str:
  where = (
      f'checkpoint step {step} in {directory}'
      if step is not None
      else f'checkpoint directory {directory}'
  )
  step_dir = (
      f' delete {directory / str(step)} to fall back to an earlier checkpoint, or'
      if step is not None
      else ''
  )
  return (
      f'Cannot read {where}: {type(error).__name__}: {error}\n'
      'It is corrupt (e.g. a run killed while writing it, or a damaged copy) or was written for a '
      'different model, optimizer or config. To continue,'
      f'{step_dir} delete {directory} to start this phase over, or use a new --workdir.'
  )
