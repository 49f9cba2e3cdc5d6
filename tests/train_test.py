"""Tests of the training program: pure steps, optimizer, phase loop, resume, command line."""

import json
import math
import shutil
import sys

from absl import flags
from absl.testing import flagsaver
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import default as default_config
from configs import digits as digits_config
from configs import test as test_config
import dpm_jax
from dpm_jax import checkpoint
from dpm_jax import models
from train import main as main_lib
from train import loop
from train import train

# With the test config's batch of 8: 3 steps per epoch.
MOCK_EXAMPLES = 24


def _config(**overrides):
  config = test_config.get_config()
  config.update(overrides)
  return config


def _model(config):
  return models.create_model(
      config.model, num_classes=10, rngs=nnx.Rngs(0), **config.model_kwargs.to_dict()
  )


def _final_state(config, workdir) -> loop.TrainState:
  """The last checkpointed state of a run's 'pretrain' phase."""
  _, params, batch_stats = loop.split_model(_model(config))
  target = loop.create_train_state(
      params, batch_stats, loop.create_optimizer(config, steps_per_epoch=3)
  )
  manager = checkpoint.create_manager(workdir / 'pretrain')
  try:
    return checkpoint.restore(manager, target)
  finally:
    manager.close()


def _records(workdir) -> list[dict]:
  return [json.loads(line) for line in (workdir / loop.METRICS_FILENAME).read_text().splitlines()]


def _assert_trees_equal(actual, expected) -> None:
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), e in zip(jax.tree.leaves_with_path(actual), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, e, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope='module')
def mock_run(tmp_path_factory):
  """One `train_and_evaluate` of the test config on mock digits (random images)."""
  workdir = tmp_path_factory.mktemp('mock_run')
  # No augmentation and 6 epochs over the same 24 images: the loss must fall.
  config = _config(augment=False, num_epochs=6)
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    result = train.train_and_evaluate(config, workdir)
  return config, workdir, result


# ----------------------------------------------------------------------------
# Pure functions.


def test_train_step_lowers_the_loss_on_a_fixed_batch():
  config = _config()
  graphdefs, params, batch_stats = loop.split_model(_model(config))
  tx = loop.create_optimizer(config, steps_per_epoch=10)
  state = loop.create_train_state(params, batch_stats, tx)
  rng = np.random.default_rng(0)
  batch = {
      'image': rng.normal(size=(8, 8, 8, 1)).astype(np.float32),
      'label': rng.integers(0, 10, 8).astype(np.int32),
  }
  step_fn = loop.make_train_step(graphdefs.train, tx)
  losses = []
  for _ in range(10):
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics['loss']))
  assert int(state.step) == 10
  assert losses[-1] < 0.25 * losses[0], losses
  # Eval mode uses the running statistics that the train steps updated.
  assert jax.tree.leaves(state.batch_stats)
  sums = loop.make_eval_step(graphdefs.eval)(
      state.params, state.batch_stats, {**batch, 'mask': np.ones(8, np.float32)}
  )
  assert float(sums['count']) == 8.0


def test_background_compiled_step_equals_the_jitted_step_and_falls_back():
  config = _config()
  graphdefs, params, batch_stats = loop.split_model(_model(config))
  tx = loop.create_optimizer(config, steps_per_epoch=10)
  rng = np.random.default_rng(0)
  batch = {
      'image': rng.normal(size=(8, 8, 8, 1)).astype(np.float32),
      'label': rng.integers(0, 10, 8).astype(np.int32),
  }
  state_like = loop.abstract_state(jax.eval_shape(
      lambda p, b: loop.TrainState(jnp.zeros((), jnp.int32), p, b, tx.init(p)),
      params, batch_stats))
  batch_like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  step_fn = loop.make_train_step(graphdefs.train, tx)
  ahead = loop.BackgroundCompiledStep(step_fn, state_like, batch_like).start()
  copy = lambda: jax.tree.map(jnp.array, loop.create_train_state(params, batch_stats, tx))
  expected, _ = step_fn(copy(), batch)
  actual, metrics = ahead(copy(), batch)
  assert ahead._use is ahead._compiled  # pylint: disable=protected-access
  _assert_trees_equal(jax.device_get(actual), jax.device_get(expected))
  assert np.isfinite(float(metrics['loss']))
  # Another batch size than it was compiled for, or never started: the jitted step runs.
  other = loop.BackgroundCompiledStep(step_fn, state_like, batch_like).start()
  half = {k: v[:4] for k, v in batch.items()}
  state, _ = other(copy(), half)
  assert other._use is step_fn  # pylint: disable=protected-access
  _assert_trees_equal(jax.device_get(state), jax.device_get(step_fn(copy(), half)[0]))
  idle = loop.BackgroundCompiledStep(step_fn, state_like, batch_like)
  idle(copy(), batch)
  assert idle._use is step_fn and idle._compiled is None  # pylint: disable=protected-access


@pytest.mark.parametrize('recipe', [
    None,  # The plain optimizer of pretraining and fine-tuning.
    dpm_jax.recipes.depgraph(0.5, removal='dpm', sparse_learning=True),
    dpm_jax.recipes.sfp(0.5, removal='dpm_sp'),
    dpm_jax.recipes.psap(0.5),
    dpm_jax.recipes.gate_decorator(0.5, removal='dpm', end_step=10_000),
    dpm_jax.recipes.otov2(0.5, removal='dpm'),
], ids=['plain', 'depgraph_sl+sr', 'sfp+sp', 'psap', 'gate_decorator+sr', 'otov2+sr'])
def test_train_state_holds_the_optimizer_state_tx_init_gives(recipe):
  # create_train_state initialises the optimizer jitted: the values must be tx.init's own.
  model = models.create_model('digits_cnn', num_classes=10, rngs=nnx.Rngs(0))
  _, params, batch_stats = loop.split_model(model)
  tx = loop.create_optimizer(digits_config.get_config(), steps_per_epoch=10)
  if recipe is not None:
    spec = dpm_jax.trace_groups(model, jnp.zeros((1, 8, 8, 1)))
    tx = dpm_jax.prune(tx, spec, recipe)
  state = loop.create_train_state(params, batch_stats, tx)
  eager = tx.init(params)
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(eager)
  for got, want in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(eager)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), strict=True)


def test_eval_step_ignores_padding_rows():
  graphdefs, params, batch_stats = loop.split_model(_model(_config()))
  eval_fn = loop.make_eval_step(graphdefs.eval)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(6, 8, 8, 1)).astype(np.float32)
  labels = rng.integers(0, 10, 6).astype(np.int32)
  real = {'image': images[:4], 'label': labels[:4], 'mask': np.ones(4, np.float32)}
  padded = {'image': images, 'label': labels, 'mask': np.array([1, 1, 1, 1, 0, 0], np.float32)}
  np.testing.assert_allclose(
      loop.evaluate(eval_fn, params, batch_stats, [padded])['loss'],
      loop.evaluate(eval_fn, params, batch_stats, [real])['loss'],
      rtol=1e-6,
  )
  halves = [{k: v[:2] for k, v in real.items()}, {k: v[2:] for k, v in real.items()}]
  assert loop.evaluate(eval_fn, params, batch_stats, halves) == pytest.approx(
      loop.evaluate(eval_fn, params, batch_stats, [real]), rel=1e-6
  )


def test_learning_rate_schedules():
  config = default_config.get_config()
  config.update(
      learning_rate=0.1,
      num_epochs=10,
      lr_schedule='piecewise',
      lr_milestones=(4, 8),
      lr_decay_factor=0.1,
  )
  lr = loop.create_learning_rate_schedule(config, steps_per_epoch=10)
  assert [float(lr(s)) for s in (0, 39, 40, 79, 80)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])

  config.warmup_epochs = 2  # Milestones still count from the start of training.
  lr = loop.create_learning_rate_schedule(config, steps_per_epoch=10)
  assert [float(lr(s)) for s in (0, 10, 20, 39, 40, 80)] == pytest.approx(
      [0.0, 0.05, 0.1, 0.1, 0.01, 0.001]
  )

  config.update(lr_schedule='cosine', warmup_epochs=0.0)
  lr = loop.create_learning_rate_schedule(config, steps_per_epoch=10)
  assert [float(lr(s)) for s in (0, 50, 100)] == pytest.approx([0.1, 0.05, 0.0], abs=1e-7)


@pytest.mark.parametrize('optimizer', ['sgd', 'adam'])
def test_weight_decay_applies_to_kernels_only(optimizer):
  config = default_config.get_config()
  config.update(
      optimizer=optimizer, momentum=0.0, weight_decay=0.5, lr_schedule='constant', learning_rate=0.1
  )
  params = {
      'dense': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)},
      'bn': {'scale': jnp.ones(3)},
  }
  tx = loop.create_optimizer(config, steps_per_epoch=1)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  # Coupled L2 (PyTorch's weight_decay): wd * w joins the gradient before the optimizer.
  # SGD steps by -lr * wd * w; Adam normalises the decay term to -lr (AdamW's decoupled
  # decay would step by -lr * wd * w).
  expected = {'sgd': -0.1 * 0.5, 'adam': -0.1}[optimizer]
  np.testing.assert_allclose(updates['dense']['kernel'], np.full((2, 3), expected), rtol=1e-5)
  assert not np.any(updates['dense']['bias']) and not np.any(updates['bn']['scale'])


@pytest.mark.parametrize(
    'field, value, valid',
    [
        ('model', 'resnet9000', 'resnet56'),
        ('dataset', 'mnist', 'cifar10'),
        ('optimizer', 'lion', 'sgd'),
        ('lr_schedule', 'linear', 'piecewise'),
    ],
)
def test_unknown_names_are_rejected_before_any_work(tmp_path, field, value, valid):
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=f'config.{field}.*{value}.*{valid}'):
    train.train_and_evaluate(_config(**{field: value}), workdir)
  assert not workdir.exists()


def _with(config, **overrides):
  """`config` with fields set by '.'-joined names ('pruning.epochs')."""
  for name, value in overrides.items():
    *parents, field = name.split('.')
    holder = config
    for parent in parents:
      holder = holder[parent]
    holder[field] = value
  return config


@pytest.mark.parametrize(
    'field, value, requirement',
    [
        ('learning_rate', -0.1, 'must be a number > 0'),
        ('learning_rate', 0.0, 'must be a number > 0'),
        ('learning_rate', float('nan'), 'must be a number > 0'),
        ('batch_size', 0, 'must be an int >= 1'),
        ('num_epochs', -1, 'must be a number >= 0'),
        ('momentum', 1.0, 'must be a number in [0, 1)'),
        ('log_every_steps', 0, 'must be an int >= 1'),
        ('lr_milestones', (10, -1), 'must be epochs: numbers >= 0'),
        ('pruning.learning_rate', -0.01, 'must be a number > 0'),
        ('pruning.target_flops', 0.0, 'must be a number in (0, 1]'),
        ('pruning.record_every_steps', 0, 'must be an int >= 1'),
        ('pruning.finetune_lr_schedule', 'linear', 'is unknown; valid choices: constant'),
    ],
)
def test_invalid_fields_are_rejected_before_any_work(tmp_path, field, value, requirement):
  config = _with(_config(), **{'pruning.enabled': field.startswith('pruning.'), field: value})
  workdir = tmp_path / 'run'
  with pytest.raises(loop.ConfigError) as error:
    train.train_and_evaluate(config, workdir)
  message = str(error.value)
  assert f'config.{field}={value!r} {requirement}' in message, message
  assert f'with --config.{field}=' in message, message  # What to do.
  assert not workdir.exists()


def _run_main(argv, monkeypatch) -> None:
  """`train.main` as the command line runs it: flags parsed from `argv`, then `main`."""
  monkeypatch.setattr(sys, 'argv', argv)  # Where config_flags reads `--config.*` overrides.
  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    main_lib.main(main_lib.parse_flags(argv))


def _one_line_error(capsys) -> str:
  err = capsys.readouterr().err
  assert 'Traceback' not in err, err
  return err.strip().splitlines()[-1]


# ml_collections loads config files with the deprecated `load_module`.
@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
def test_invalid_value_on_the_command_line_is_one_line(tmp_path, monkeypatch, capsys):
  argv = ['main', '--config=configs/digits_dpm.py', '--config.learning_rate=-0.1',
          f'--workdir={tmp_path / "run"}']
  with pytest.raises(SystemExit) as exit_:
    _run_main(argv, monkeypatch)
  assert exit_.value.code == 2
  line = _one_line_error(capsys)
  assert line.startswith('Invalid config: config.learning_rate=-0.1 must be a number > 0'), line
  assert not (tmp_path / 'run').exists()


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
@pytest.mark.parametrize(
    'override, named, nearest',
    [
        ('--config.learning_rat=0.1', 'config.learning_rat;', 'did you mean config.learning_rate?'),
        ('--config.pruning.learnig_rate=0.1', 'config.pruning.learnig_rate;',
         'config.pruning.learning_rate'),
        ('--config.prunning.epochs=3', 'config.prunning;', 'did you mean config.pruning?'),
        ('--config.no_such_field=1', 'config.no_such_field;',
         'the fields of config are: adam_b1, adam_b2, augment'),
    ],
)
def test_unknown_field_on_the_command_line_is_one_line(
    tmp_path, monkeypatch, capsys, override, named, nearest
):
  argv = ['main', '--config=configs/digits_dpm.py', override, f'--workdir={tmp_path}']
  with pytest.raises(SystemExit) as exit_:
    _run_main(argv, monkeypatch)
  assert exit_.value.code == 2
  line = _one_line_error(capsys)
  assert f'{override}: unknown field {named}' in line and nearest in line, line


# ----------------------------------------------------------------------------
# Whole runs.


def test_train_and_evaluate_on_mock_data(mock_run):
  config, workdir, result = mock_run
  assert set(result) >= {'test_accuracy', 'test_loss', 'train_loss', 'train_accuracy'}
  assert 0.0 <= result['test_accuracy'] <= 1.0 and np.isfinite(result['test_loss'])

  records = _records(workdir)
  epochs = [r for r in records if 'test_accuracy' in r]
  assert [r['step'] for r in epochs] == [3, 6, 9, 12, 15, 18]
  assert all(r['phase'] == 'pretrain' for r in records)
  for record in epochs:
    assert set(record) == {
        'phase',
        'step',
        'epoch',
        'time',
        'lr',
        'train_loss',
        'train_accuracy',
        'test_loss',
        'test_accuracy',
    }
  assert epochs[-1]['test_accuracy'] == result['test_accuracy']
  # The training loss falls: last epoch against first.
  assert epochs[-1]['train_loss'] < 0.7 * epochs[0]['train_loss'], [r['train_loss'] for r in epochs]

  assert checkpoint.load_arch(workdir / 'pretrain') == json.loads(json.dumps(_model(config).arch()))
  assert (workdir / 'pretrain' / '18').is_dir()
  assert json.loads((workdir / 'config.json').read_text())['model'] == config.model


def test_finished_run_started_again_only_evaluates(mock_run, tmp_path):
  config, workdir, result = mock_run
  workdir = shutil.copytree(workdir, tmp_path / 'copy')
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    again = train.train_and_evaluate(config, workdir)
  assert again['test_accuracy'] == pytest.approx(result['test_accuracy'])
  assert again['test_loss'] == pytest.approx(result['test_loss'], rel=1e-5)
  assert len(_records(workdir)) == len(_records(mock_run[1]))


def test_corrupt_checkpoint_stops_the_run_with_clear_error(mock_run, tmp_path):
  config, workdir, _ = mock_run
  workdir = shutil.copytree(workdir, tmp_path / 'copy')
  for path in (workdir / 'pretrain' / '18' / 'default').rglob('*'):
    if path.is_file():
      path.write_bytes(b'garbage')
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    with pytest.raises(checkpoint.CheckpointError) as error:
      train.train_and_evaluate(config, workdir)
  assert str(workdir / 'pretrain') in str(error.value) and 'new --workdir' in str(error.value)


class _Killed(Exception):
  pass


def test_killed_run_resumes_to_the_same_final_state(tmp_path, monkeypatch):
  config = _config()  # 2 epochs of 3 steps, a checkpoint after each epoch.
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    train.train_and_evaluate(config, tmp_path / 'uninterrupted')

    # Killed during step 5, after the epoch-1 checkpoint (step 3) and a metrics record of step 4.
    make_train_step = loop.make_train_step

    def make_killing_train_step(graphdef, tx, **placement):
      step_fn, calls = make_train_step(graphdef, tx, **placement), []

      def killing_step(state, batch):
        calls.append(None)
        if len(calls) == 5:
          raise _Killed()
        return step_fn(state, batch)

      return killing_step

    monkeypatch.setattr(loop, 'make_train_step', make_killing_train_step)
    with pytest.raises(_Killed):
      train.train_and_evaluate(config, tmp_path / 'resumed')
    assert [r['step'] for r in _records(tmp_path / 'resumed')] == [2, 3, 4]
    monkeypatch.setattr(loop, 'make_train_step', make_train_step)

    # Resumed from step 3, then killed as soon as the last checkpoint (step 6) is written.
    save = checkpoint.save

    def save_then_kill(manager, step, state, **kwargs):
      written = save(manager, step, state, **kwargs)
      manager.wait_until_finished()
      if step == 6:
        raise _Killed()
      return written

    monkeypatch.setattr(checkpoint, 'save', save_then_kill)
    with pytest.raises(_Killed):
      train.train_and_evaluate(config, tmp_path / 'resumed')
    monkeypatch.setattr(checkpoint, 'save', save)
    train.train_and_evaluate(config, tmp_path / 'resumed')  # Restored at the end: evaluates.

  expected = jax.device_get(_final_state(config, tmp_path / 'uninterrupted'))
  actual = jax.device_get(_final_state(config, tmp_path / 'resumed'))
  assert int(actual.step) == 6
  _assert_trees_equal(actual, expected)
  # The records of the killed runs after their checkpoints were replaced, not duplicated, and
  # the record of the step last checkpointed was written.
  steps = [r['step'] for r in _records(tmp_path / 'resumed')]
  assert steps == [r['step'] for r in _records(tmp_path / 'uninterrupted')] == [2, 3, 4, 6]


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
def test_diverged_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, monkeypatch, capsys):
  # Epoch 1 (steps 1-3) at a sane rate, then 1e28 from step 4 on: the loss overflows.
  workdir = tmp_path / 'run'
  argv = ['main', '--config=configs/test.py', '--config.lr_schedule=piecewise',
          '--config.lr_milestones=(1,)', '--config.lr_decay_factor=1e30',
          f'--workdir={workdir}']
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    with pytest.raises(SystemExit) as exit_:
      _run_main(argv, monkeypatch)
  assert exit_.value.code == 1
  line = _one_line_error(capsys)
  assert "TrainingDivergedError: Training diverged in phase 'pretrain', epoch 2" in line, line
  assert f'last good checkpoint, step 3 in {workdir / "pretrain"}, is kept' in line, line
  assert 'Lower the learning rate of this phase' in line, line

  assert sorted(p.name for p in (workdir / 'pretrain').iterdir() if p.name.isdigit()) == ['3']
  state = jax.device_get(_final_state(test_config.get_config(), workdir))
  assert int(state.step) == 3
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))
  records = _records(workdir)
  assert records and all(
      math.isfinite(v) for r in records for v in r.values() if isinstance(v, float)
  ), records


def test_non_finite_params_are_not_checkpointed(tmp_path):
  config = _config(num_epochs=1)
  graphdefs, params, batch_stats = loop.split_model(_model(config))
  tx = loop.create_optimizer(config, steps_per_epoch=3)
  step_fn = loop.make_train_step(graphdefs.train, tx)

  def step_to_nan(state, batch):  # A finite loss, but the last update overflows.
    state, metrics = step_fn(state, batch)
    if int(state.step) == 3:
      state = state._replace(params=jax.tree.map(lambda p: p * jnp.inf, state.params))
    return state, metrics

  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    with pytest.raises(loop.TrainingDivergedError) as error:
      loop.train_phase(
          'phase',
          loop.create_train_state(params, batch_stats, tx),
          graphdefs=graphdefs,
          tx=tx,
          num_steps=3,
          steps_per_epoch=3,
          config=config,
          workdir=tmp_path,
          arch={'name': 'test'},
          writer=loop.MetricsWriter(tmp_path / loop.METRICS_FILENAME),
          train_step_fn=step_to_nan,
      )
  assert 'params or batch statistics are not finite after step 3' in str(error.value)
  assert 'No checkpoint of this phase was written yet' in str(error.value)
  assert not [p for p in (tmp_path / 'phase').iterdir() if p.name.isdigit()]


def test_metrics_writer_drops_a_cut_last_line_and_replaces_a_phase(tmp_path):
  path = tmp_path / loop.METRICS_FILENAME
  path.write_text('{"phase": "a", "step": 1}\n{"phase": "a", "st')  # Killed while writing.
  writer = loop.MetricsWriter(path)
  assert writer.records == [{'phase': 'a', 'step': 1}]
  writer.write({'phase': 'result', 'accuracy': 0.5})
  writer.replace({'phase': 'result', 'accuracy': 0.75})
  assert _records(tmp_path) == [{'phase': 'a', 'step': 1}, {'phase': 'result', 'accuracy': 0.75}]


def test_train_phase_calls_its_hooks(tmp_path):
  config = _config(num_epochs=1)
  graphdefs, params, batch_stats = loop.split_model(_model(config))
  tx = loop.create_optimizer(config, steps_per_epoch=3)
  calls = []
  kwargs = dict(
      graphdefs=graphdefs,
      tx=tx,
      num_steps=3,
      steps_per_epoch=3,
      config=config,
      workdir=tmp_path,
      arch={'name': 'test'},
      writer=loop.MetricsWriter(tmp_path / loop.METRICS_FILENAME),
      step_callback=lambda step, state: calls.append(('step', step, int(state.step))),
      on_resume=lambda step: calls.append(('resume', step)),
  )
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    state, metrics = loop.train_phase(
        'phase', loop.create_train_state(params, batch_stats, tx), **kwargs
    )
    assert calls == [('resume', 0), ('step', 1, 1), ('step', 2, 2), ('step', 3, 3)]
    assert int(state.step) == 3 and set(metrics) >= {'test_accuracy', 'train_loss'}
    # Started again: restored at the end, nothing left to train.
    _, params, batch_stats = loop.split_model(_model(config))
    loop.train_phase('phase', loop.create_train_state(params, batch_stats, tx), **kwargs)
    assert calls[4:] == [('resume', 3)]


# ml_collections loads config files with the deprecated `load_module`.
@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
def test_digits_end_to_end_through_the_command_line(tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  argv = [
      'main',
      '--config=configs/digits.py',
      '--config.num_epochs=2',
      '--config.progress_bar=False',
      f'--config.data_dir={tmp_path / "data"}',
      f'--workdir={workdir}',
  ]
  monkeypatch.setattr(sys, 'argv', argv)  # Where config_flags reads `--config.*` overrides.
  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    main_lib.main(flags.FLAGS(argv))
  final = _records(workdir)[-1]
  assert final['epoch'] == 2 and final['test_accuracy'] > 0.85, final
  assert digits_config.get_config().num_epochs == 10  # The flag overrode a copy.


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
def test_main_prints_and_writes_where_the_time_went(tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  argv = ['main', '--config=configs/test.py', '--config.num_epochs=1',
          '--config.compilation_cache=', f'--workdir={workdir}']
  with tfds.testing.mock_data(num_examples=24):
    _run_main(argv, monkeypatch)
  seconds = json.loads((workdir / 'timings.json').read_text())
  for section in ('imports', 'data', 'model', 'pretrain: compile + first step',
                  'pretrain: steps', 'pretrain: evaluation', 'pretrain: checkpoints'):
    assert seconds[section] > 0, (section, seconds)
  assert seconds['total'] == pytest.approx(sum(v for k, v in seconds.items() if k != 'total'))
  # The first step compiles: it takes longer than the two others together.
  assert seconds['pretrain: compile + first step'] > seconds['pretrain: steps']


def test_compilation_cache_is_turned_on_by_the_config(tmp_path):
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  old = {name: getattr(jax.config, name) for name in names}
  try:
    jax.config.update('jax_compilation_cache_dir', None)
    main_lib.use_compilation_cache('')
    assert jax.config.jax_compilation_cache_dir is None
    main_lib.use_compilation_cache(str(tmp_path / 'cache'))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'cache')
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    # A directory already set (JAX_COMPILATION_CACHE_DIR) wins.
    main_lib.use_compilation_cache(str(tmp_path / 'other'))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'cache')
  finally:
    for name, value in old.items():
      jax.config.update(name, value)
