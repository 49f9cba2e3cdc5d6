"""A tiny config for tests: a narrow CNN for a few steps on CIFAR-10-shaped data.

Meant for `tfds.testing.mock_data` (random images; accuracy means nothing), as in
tests/train_test.py:

  python -m pytest tests/train_test.py

The model is `digits_cnn` widened to 32x32x3 inputs but narrowed to 8 and 16
channels: cheap to initialise and compile on CPU, and it still has convolutions,
BatchNorm statistics, a flatten and dense layers.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """A few steps of a narrow CNN on CIFAR-10 shapes."""
  config = default.get_config()
  config.model = 'digits_cnn'
  config.model_kwargs = ml_collections.ConfigDict(
      {'conv_widths': (8, 16), 'dense_widths': (32,), 'in_channels': 3, 'image_size': 32}
  )
  config.dataset = 'cifar10'
  config.learning_rate = 0.01
  config.lr_schedule = 'cosine'
  config.batch_size = 8
  config.num_epochs = 2  # With mock_data(num_examples=24): 3 steps per epoch.
  config.eval_batch_size = 16
  config.log_every_steps = 2
  config.checkpoint_every_epochs = 1
  config.progress_bar = False
  return config
