"""The peer benchmark's PyTorch job is the job of configs/digits_hard.py; without torch the
benchmark stops before any work. Nothing here imports torch."""

import importlib
import importlib.util

import numpy as np
import pytest

from bench import peer_torch_pruning as peer
from dpm_jax import data
from dpm_jax.pruning import allocations
from dpm_jax.pruning import criteria
from dpm_jax.pruning import removals
from train import pruning

NUM_TRAIN = 1437  # Digits training examples, as in dpm_jax.data.


@pytest.fixture(scope='module')
def config():
  return importlib.import_module('configs.digits_hard').get_config()


def test_the_job_has_the_settings_of_the_config(config):
  job, p = peer.JOB, config.pruning
  assert (config.model, config.dataset, config.optimizer) == ('digits_cnn', 'digits', 'sgd')
  assert not config.nesterov and config.warmup_epochs == 0
  assert (job.batch_size, job.momentum, job.weight_decay) == (
      config.batch_size, config.momentum, config.weight_decay)
  assert (job.pretrain_epochs, job.pretrain_lr, 'cosine') == (
      config.num_epochs, config.learning_rate, config.lr_schedule)
  assert (job.prune_epochs, job.prune_lr, 'constant') == (p.epochs, p.learning_rate,
                                                          p.lr_schedule)
  assert (job.finetune_epochs, job.finetune_lr, 'cosine') == (
      p.finetune_epochs, p.finetune_learning_rate, p.finetune_lr_schedule)
  assert (job.num_events, job.first_event_epoch, job.last_event_epoch) == (
      p.num_events, p.start_epoch, p.end_epoch)
  assert p.round_to == 1 and p.min_channels == 1 and not p.sparse_learning


@pytest.mark.parametrize('budget', [0.5, 0.2])
def test_events_and_criterion_are_the_recipes(config, budget):
  steps_per_epoch = NUM_TRAIN // config.batch_size
  config = config.copy_and_resolve_references()
  config.pruning.target_flops = budget
  recipe = pruning.recipe_from_config(config.pruning, steps_per_epoch)
  assert peer.JOB.event_steps(steps_per_epoch) == recipe.schedule.event_steps
  np.testing.assert_allclose(peer.JOB.event_targets(budget), recipe.schedule.targets(budget))
  assert isinstance(recipe.criterion, criteria.GroupL2)
  assert isinstance(recipe.allocation, allocations.Global) and recipe.allocation.normalize
  assert isinstance(recipe.removal, removals.Hard)


def _rows(images: np.ndarray, labels: np.ndarray) -> list[bytes]:
  """Every (label, image) pair as bytes, sorted: the split as a multiset, in any order."""
  return sorted(np.int64(y).tobytes() + x.tobytes() for x, y in zip(images, labels))


@pytest.mark.parametrize('split', ['train', 'test'])
def test_the_jobs_data_is_what_the_pipeline_yields(tmp_path, split):
  arrays = peer.digits_arrays()
  images, labels = arrays[split]
  batch = next(data.eval_iterator('digits', batch_size=len(labels), data_dir=str(tmp_path),
                                  split=split))
  assert batch['mask'].all()
  assert _rows(batch['image'], batch['label']) == _rows(images, labels)  # Bit for bit.


def test_stops_early_without_torch(monkeypatch, tmp_path):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'torch' else find_spec(name, *a))
  out = tmp_path / 'out'
  with pytest.raises(SystemExit) as e:
    peer.main(['--budgets', '0.5', '--seeds', '0', '--out', str(out)])
  assert 'torch' in str(e.value) and "pip install -e '.[peer]'" in str(e.value)
  assert not out.exists()
