"""End-to-end pruning runs: pretrain, prune with DPM, finalize, surgery, fine-tune, report."""

import json

import jax
from jax.experimental.compilation_cache import compilation_cache
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import digits_dpm
from configs import digits_psap_scratch
from dpm_jax import checkpoint
from dpm_jax import data
from dpm_jax import report
from dpm_jax.pruning import criteria
from dpm_jax.pruning import removals
from dpm_jax.pruning import schedules
from dpm_jax.pruning.base import DECAYING
from train import loop
from train import pruning
from train import train


def _config(tmp_path, **pruning_overrides):
  """A short digits run: 2 pretrain epochs, 4 prune epochs, 1 fine-tune epoch."""
  config = digits_dpm.get_config()
  config.data_dir = str(tmp_path / 'data')
  config.num_epochs = 2
  config.progress_bar = False
  config.log_every_steps = 1000
  p = config.pruning
  p.epochs = 4.0
  p.end_epoch = 2.0
  p.num_events = 3
  p.decay_steps = 20
  p.min_decay_steps = 2
  p.cooldown = 20
  p.finetune_epochs = 1.0
  p.update(pruning_overrides)
  return config


@pytest.mark.parametrize('removal', ['dpm', 'hard'])
def test_pruning_run_meets_target_and_writes_report(tmp_path, removal, monkeypatch):
  config = _config(tmp_path, removal=removal)
  workdir = tmp_path / 'run'
  compiled_ahead = []  # Every step compiled in the background, as the run makes them.
  init = loop.BackgroundCompiledStep.__init__

  def recording_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    compiled_ahead.append(self)

  monkeypatch.setattr(loop.BackgroundCompiledStep, '__init__', recording_init)
  result = train.train_and_evaluate(config, workdir)

  # The prune and fine-tune steps were compiled while the phase before them trained, and
  # those compiles are what ran (not a fallback compile at the phase's first step).
  assert len(compiled_ahead) == 2
  for step in compiled_ahead:
    assert step._compiled is not None and step._use is step._compiled  # pylint: disable=protected-access

  assert abs(result['flops_ratio'] - 0.5) <= 0.01
  assert result['params_ratio'] < 1.0
  assert result['surgery_max_abs_diff'] < 1e-4
  assert result['test_accuracy'] > 0.85
  assert json.loads((workdir / 'result.json').read_text())['flops_ratio'] == result['flops_ratio']
  report = (workdir / 'report.md').read_text()
  assert '| # | group | channels before | after |' in report
  for png in ('widths.png', 'decay.png'):
    assert (workdir / png).read_bytes()[:4] == b'\x89PNG'
  phases = {json.loads(l)['phase'] for l in (workdir / 'metrics.jsonl').read_text().splitlines()}
  assert {'pretrain', 'prune', 'finetune', 'result'} <= phases

  # The exported model loads without the pruning code and is the smaller network.
  small = checkpoint.load_model(workdir / 'export')
  arch = small.arch()
  assert arch['conv_widths'] != [32, 64]
  batch = next(data.eval_iterator('digits', batch_size=360, data_dir=config.data_dir))
  accuracy = np.mean(np.asarray(small(jnp.asarray(batch['image'])).argmax(-1))
                     == batch['label'])
  assert accuracy == pytest.approx(result['test_accuracy'], abs=1e-6)


def test_self_rectifying_settles_before_the_phase_ends_at_a_tiny_budget(tmp_path):
  # Thresholds that release every decaying channel after two decay steps, and no cooldown:
  # releases and replacements would go on to the end of the phase if they did not stop.
  config = _config(tmp_path, target_flops=0.02, rate_threshold=-0.99, len_threshold=0.0,
                   logic='or', min_decay_steps=2, cooldown=0)
  workdir = tmp_path / 'run'
  result = train.train_and_evaluate(config, workdir)
  recipe = pruning.recipe_from_config(config.pruning, steps_per_epoch=44)
  traj = report.Trajectories.load(workdir / 'prune' / pruning.TRAJECTORIES)
  assert traj.released.sum() > 10
  deadline = recipe.schedule.last_event + recipe.removal.release_window
  assert traj.released_at[traj.released > 0].max() < deadline
  # Every decay has finished by the recipe's last step, well before the phase ends: the
  # network the phase ends with is the one surgery keeps.
  assert recipe.last_step < round(config.pruning.epochs * 44)
  settled = traj.status[traj.steps >= recipe.last_step]
  assert len(settled) and not (settled == DECAYING).any()
  assert result['flops_ratio'] <= 0.02 + 1e-6
  assert result['surgery_max_abs_diff'] < 1e-4
  assert result['surgery_test_accuracy'] == pytest.approx(result['prune_test_accuracy'],
                                                          abs=1e-6)


def test_finished_run_resumes_to_the_same_result(tmp_path):
  config = _config(tmp_path, finetune_epochs=0.0)
  workdir = tmp_path / 'run'
  first = train.train_and_evaluate(config, workdir)
  again = train.train_and_evaluate(config, workdir)  # every phase restores its checkpoint
  assert again['flops_ratio'] == first['flops_ratio']
  assert again['test_accuracy'] == first['test_accuracy']


# A tiny run on mock digits: 4 steps per epoch; pretrain 8 steps, prune 16, fine-tune 8.
MOCK_EXAMPLES = 64
TINY_STEPS = {'pretrain': 8, 'prune': 16, 'finetune': 8}


def _tiny_config() -> ml_collections.ConfigDict:
  config = digits_dpm.get_config()
  config.model_kwargs = ml_collections.ConfigDict({'conv_widths': (4, 8), 'dense_widths': (16,)})
  config.update(batch_size=16, eval_batch_size=MOCK_EXAMPLES, num_epochs=2, log_every_steps=3,
                progress_bar=False, checkpoint_every_epochs=1)
  config.pruning.update(epochs=4.0, end_epoch=2.0, num_events=3, decay_steps=3,
                        min_decay_steps=1, cooldown=3, record_every_steps=1,
                        finetune_epochs=2.0)
  return config


class _Killed(Exception):
  """Stands for a kill -9 right after a step: nothing after it is written."""


def _kill_after(monkeypatch, phase: str, step: int) -> None:
  """Makes the run stop in `phase` right after its step `step`."""
  train_phase = loop.train_phase

  def killed_train_phase(name, state, **kwargs):
    if name == phase:
      callback = kwargs.get('step_callback')

      def step_callback(done, state):
        if callback is not None:
          callback(done, state)
        if done == step:
          raise _Killed(f'{phase} step {step}')

      kwargs['step_callback'] = step_callback
    return train_phase(name, state, **kwargs)

  monkeypatch.setattr(loop, 'train_phase', killed_train_phase)


def _outputs(workdir) -> dict:
  """What a run leaves: result.json, metrics.jsonl without wall times, the trajectories."""
  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  with np.load(workdir / 'prune' / pruning.TRAJECTORIES) as traj:
    trajectories = {k: traj[k].tolist() for k in traj.files}
  return {
      'result': json.loads((workdir / 'result.json').read_text()),
      'metrics': [{k: v for k, v in r.items() if k != 'time'} for r in records],
      'trajectories': trajectories,
  }


@pytest.fixture
def compile_once(tmp_path):
  """A persistent compilation cache for this test: a run started again does not compile
  the pruning step again (it takes seconds)."""
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  saved = {name: getattr(jax.config, name) for name in names}
  jax.config.update('jax_compilation_cache_dir', str(tmp_path / 'compilation_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  compilation_cache.reset_cache()
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


@pytest.mark.usefixtures('compile_once')
def test_run_killed_in_each_phase_resumes_to_the_uninterrupted_outputs(tmp_path, monkeypatch):
  config = _tiny_config()
  # A step of each phase after its first checkpoint (epoch 1: step 4), so that resuming
  # drops what was written after a checkpoint; seeded, so the test is deterministic.
  rng = np.random.default_rng(0)
  kills = {phase: int(rng.integers(5, n + 1)) for phase, n in TINY_STEPS.items()}
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    train.train_and_evaluate(config, tmp_path / 'uninterrupted')
    expected = _outputs(tmp_path / 'uninterrupted')
    workdir = tmp_path / 'resumed'
    for phase, step in kills.items():
      with monkeypatch.context() as m:
        _kill_after(m, phase, step)
        with pytest.raises(_Killed):
          train.train_and_evaluate(config, workdir)
    train.train_and_evaluate(config, workdir)
    assert _outputs(workdir) == expected, kills
    train.train_and_evaluate(config, workdir)  # Finished: started again, it only evaluates.
    assert _outputs(workdir) == expected, kills
  assert expected['trajectories']['steps'] == list(range(1, 17))
  assert [r['phase'] for r in expected['metrics']].count('result') == 1


@pytest.mark.parametrize('overrides, message', [
    (dict(epochs=1.0), 'too short'),
    (dict(method='otov9'), 'config.pruning.method'),
    (dict(decay_steps=0), 'decay_steps'),
    (dict(target_flops=1.5), 'target_flops'),
    (dict(removal='soft-ish'), 'removal'),
])
def test_bad_pruning_config_fails_before_training(tmp_path, overrides, message):
  config = _config(tmp_path, **overrides)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, tmp_path / 'run')
  assert not (tmp_path / 'run' / 'pretrain').exists()


def test_recipe_from_config_converts_epochs_to_steps():
  config = digits_dpm.get_config()
  recipe = pruning.recipe_from_config(config.pruning, steps_per_epoch=44)
  assert recipe.schedule == schedules.Iterative(start_step=0, end_step=4 * 44, num_events=5)
  assert isinstance(recipe.removal, removals.SelfRectifying)
  assert recipe.removal.decay_steps == 44 and recipe.removal.cooldown == 44
  # Fields the chosen parts do not take are left out (a hard removal does not decay).
  config.pruning.removal = 'hard'
  assert pruning.recipe_from_config(config.pruning, steps_per_epoch=44).removal == (
      removals.Hard())
  # SFP: an event every interval; one at the end of the phase is taken at its last step.
  config.pruning.update(method='sfp', removal='soft', interval_epochs=2.0, end_epoch=8.0)
  recipe = pruning.recipe_from_config(config.pruning, steps_per_epoch=44)
  assert recipe.schedule == schedules.Interval(start_step=0, end_step=8 * 44 - 1, interval=88)
  assert recipe.schedule.event_steps == (0, 88, 176, 264, 351)
  assert recipe.criterion == criteria.L2(weights_only=True)  # None: the preset's default
  config.pruning.weights_only = False
  assert pruning.recipe_from_config(config.pruning, steps_per_epoch=44).criterion == (
      criteria.L2())


def test_psap_from_scratch_needs_no_pretraining(tmp_path):
  config = digits_psap_scratch.get_config()
  config.data_dir = str(tmp_path / 'data')
  config.progress_bar = False
  config.log_every_steps = 1000
  config.pruning.update(epochs=3.0, end_epoch=3.0, finetune_epochs=1.0)
  workdir = tmp_path / 'run'
  result = train.train_and_evaluate(config, workdir)
  assert not (workdir / 'pretrain').exists()
  assert result['dense_test_accuracy'] < 0.5   # the random initialisation
  assert result['flops_ratio'] <= 0.5 and abs(result['flops_ratio'] - 0.5) <= 0.03
  assert result['surgery_max_abs_diff'] < 1e-3  # float32 round-off on logits of hundreds
  assert result['test_accuracy'] > 0.5
  report = (workdir / 'report.md').read_text()
  assert 'ratios.png' in report and 'restored by protection' in report
  assert (workdir / 'ratios.png').read_bytes()[:4] == b'\x89PNG'
  phases = {json.loads(l)['phase'] for l in (workdir / 'metrics.jsonl').read_text().splitlines()}
  assert phases == {'prune', 'finetune', 'result'}


def test_pruning_from_scratch_only_with_pruning(tmp_path):
  config = digits_psap_scratch.get_config()
  config.pruning.enabled = False
  with pytest.raises(ValueError, match='num_epochs=0 must be positive.*pruning from scratch'):
    train.train_and_evaluate(config, tmp_path / 'run')
