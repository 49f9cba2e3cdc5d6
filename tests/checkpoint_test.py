"""Tests of dpm_jax.checkpoint: exact round trips, architecture JSON, clear errors."""

import json
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import test as test_config
import dpm_jax
from dpm_jax import checkpoint
from dpm_jax import models
from train import loop


def _model() -> nnx.Module:
  config = test_config.get_config()
  return models.create_model(
      config.model, num_classes=10, rngs=nnx.Rngs(0), **config.model_kwargs.to_dict()
  )


def _state() -> loop.TrainState:
  """A train state whose every leaf (momentum, step, BN stats included) is distinctive."""
  _, params, batch_stats = loop.split_model(_model())
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
  state = loop.create_train_state(params, batch_stats, tx)
  rng = np.random.default_rng(1)  # numpy: jax.random would compile once per leaf shape.
  return jax.tree.map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype)
      if jnp.issubdtype(x.dtype, jnp.floating)
      else x + 7,
      state,
  )


def _assert_trees_equal(actual, expected) -> None:
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), e in zip(jax.tree.leaves_with_path(actual), jax.tree.leaves(expected)):
    assert a.dtype == e.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(a, e, err_msg=jax.tree_util.keystr(path))


def test_save_then_restore_gives_identical_state(tmp_path):
  state = _state()
  expected = jax.device_get(state)
  manager = checkpoint.create_manager(tmp_path)
  assert checkpoint.save(manager, 5, state, force=True)
  manager.wait_until_finished()
  restored = checkpoint.restore(manager, checkpoint.abstract(state))
  manager.close()
  assert isinstance(restored, loop.TrainState)
  _assert_trees_equal(restored, expected)


def test_restore_latest_is_none_without_checkpoints(tmp_path):
  manager = checkpoint.create_manager(tmp_path / 'empty')
  assert checkpoint.restore_latest(manager, _state()) is None
  with pytest.raises(FileNotFoundError):
    checkpoint.restore(manager, _state())
  manager.close()


def test_restore_picks_the_latest_of_several(tmp_path):
  first, second = _state(), jax.tree.map(lambda x: x + 1, _state())
  expected = jax.device_get(second)
  manager = checkpoint.create_manager(tmp_path, max_to_keep=2)
  checkpoint.save(manager, 1, first, force=True)
  checkpoint.save(manager, 2, second, force=True)
  manager.wait_until_finished()
  _assert_trees_equal(checkpoint.restore_latest(manager, first), expected)
  manager.close()


def test_corrupt_checkpoint_gives_clear_error(tmp_path):
  manager = checkpoint.create_manager(tmp_path)
  checkpoint.save(manager, 3, _state(), force=True)
  manager.close()
  for path in (tmp_path / '3').rglob('*'):
    if path.is_file() and path.parent.name != '3':  # Everything written for the state.
      path.write_bytes(b'garbage')
  manager = checkpoint.create_manager(tmp_path)
  with pytest.raises(checkpoint.CheckpointError) as error:
    checkpoint.restore(manager, _state())
  manager.close()
  message = str(error.value)
  assert str(tmp_path) in message
  assert 'step 3' in message and 'new --workdir' in message and 'delete' in message


def test_restore_into_a_different_model_gives_clear_error(tmp_path):
  state = _state()
  manager = checkpoint.create_manager(tmp_path)
  checkpoint.save(manager, 1, state, force=True)
  manager.wait_until_finished()
  # The same model with a wider head: one kernel of another shape.
  params = jax.tree.map(lambda x: x, state.params)
  params['head']['kernel'] = jnp.zeros((32, 12))
  with pytest.raises(checkpoint.CheckpointError) as error:
    checkpoint.restore(manager, state._replace(params=params))
  assert 'params/head/kernel: (32, 10) float32 in the checkpoint, (32, 12)' in str(error.value)
  assert 'different model' in str(error.value)
  manager.close()


def test_arch_json_round_trip_and_mismatch(tmp_path):
  arch = _model().arch()
  checkpoint.save_arch(tmp_path, arch)
  checkpoint.save_arch(tmp_path, arch)  # Same architecture again: fine.
  assert checkpoint.load_arch(tmp_path) == json.loads(json.dumps(arch))
  with pytest.raises(ValueError, match='different model'):
    checkpoint.save_arch(tmp_path, {**arch, 'conv_widths': [8, 12]})
  (tmp_path / checkpoint.ARCH_FILENAME).write_text('{not json')
  with pytest.raises(checkpoint.CheckpointError, match='not valid JSON'):
    checkpoint.load_arch(tmp_path)


def test_load_model_rebuilds_the_saved_model(tmp_path):
  model = _model()
  checkpoint.save_arch(tmp_path, model.arch())
  state = _state()
  expected = jax.device_get(state)
  manager = checkpoint.create_manager(tmp_path)
  checkpoint.save(manager, 4, state, force=True)
  manager.close()

  loaded = checkpoint.load_model(tmp_path)
  assert loaded.arch() == json.loads(json.dumps(model.arch()))
  _, params, batch_stats = loop.split_model(loaded)
  _assert_trees_equal(params, expected.params)
  _assert_trees_equal(batch_stats, expected.batch_stats)


def test_export_model_then_load_model(tmp_path):
  model = _model()
  expected = jax.device_get(_state())
  for _ in range(2):  # Exporting again replaces the export.
    checkpoint.export_model(tmp_path, model.arch(), expected.params, expected.batch_stats)
  loaded = checkpoint.load_model(tmp_path)
  _, params, batch_stats = loop.split_model(loaded)
  _assert_trees_equal(params, expected.params)
  _assert_trees_equal(batch_stats, expected.batch_stats)


_RUN_EXPORTED = '''
import json, sys
import jax
import numpy as np

exported = jax.export.deserialize(open(sys.argv[1], 'rb').read())
inputs = np.load(sys.argv[2])
np.savez(sys.argv[3], **{k: np.asarray(exported.call(inputs[k])) for k in inputs})
print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))
'''


def test_exported_inference_runs_in_a_fresh_process_with_jax_alone(tmp_path):
  model = _model()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((17, 8, 8, 1)), jnp.float32)
  spec = dpm_jax.trace_groups(model, x[:1])
  keep = [rng.random(g.size) < 0.6 for g in spec.groups]
  for k in keep:
    k[0] = True
  pruned = dpm_jax.remove_channels(model, spec, keep)
  _, params, stats = loop.split_model(pruned)
  # Distinctive running statistics: eval mode must use them.
  stats = jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype), stats)
  path = checkpoint.export_inference(tmp_path, pruned.arch(), params, stats, x[:1])
  assert path == tmp_path / checkpoint.INFERENCE_FILENAME

  small = nnx.merge(nnx.graphdef(pruned), params, stats)
  small.eval()
  inputs = {'three': np.asarray(x[:3]), 'seventeen': np.asarray(x)}
  np.savez(tmp_path / 'inputs.npz', **inputs)
  proc = subprocess.run(
      [sys.executable, '-c', _RUN_EXPORTED, str(path), str(tmp_path / 'inputs.npz'),
       str(tmp_path / 'outputs.npz')],
      capture_output=True, text=True, timeout=300, check=False,
      env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  modules = json.loads(proc.stdout.strip().splitlines()[-1])
  assert not {'flax', 'dpm_jax', 'optax', 'orbax', 'train'} & set(modules), modules
  outputs = np.load(tmp_path / 'outputs.npz')
  for key, images in inputs.items():
    assert outputs[key].shape == (len(images), 10)
    np.testing.assert_allclose(outputs[key], small(jnp.asarray(images)), atol=1e-5, rtol=1e-5)
