"""Every config file loads, names known things, and its pruning settings can work."""

import importlib
import pathlib

import pytest

from train import pruning
from train import train

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parent.parent / 'configs').glob('*.py')
                 if p.stem != '__init__')
# Training examples per epoch of each dataset (as in dpm_jax.data), without reading data.
NUM_TRAIN = {'digits': 1437, 'mnist1d': 4000, 'cifar10': 50_000, 'cifar100': 50_000,
             'imagenet2012': 1_281_167}


@pytest.mark.parametrize('name', CONFIGS)
def test_config_is_valid(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  train.validate_config(config)
  if config.pruning.enabled:
    steps_per_epoch = NUM_TRAIN[config.dataset] // config.batch_size
    pruning.validate_pruning_config(config, steps_per_epoch)
    recipe = pruning.recipe_from_config(config.pruning, steps_per_epoch)
    assert recipe.last_step < config.pruning.epochs * steps_per_epoch


def test_the_demo_config_prunes():
  config = importlib.import_module('configs.digits_dpm').get_config()
  assert config.pruning.enabled and config.pruning.removal == 'dpm'


def test_the_gpu_config_rounds_widths_to_multiples_of_8():
  config = importlib.import_module('configs.cifar10_resnet56_dpm_gpu').get_config()
  steps_per_epoch = NUM_TRAIN[config.dataset] // config.batch_size
  assert pruning.recipe_from_config(config.pruning, steps_per_epoch).round_to == 8
