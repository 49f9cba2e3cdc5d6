"""Input pipelines (TFDS data sources + grain) for digits, MNIST-1D, CIFAR and ImageNet.

Example:
  >>> import tempfile
  >>> from dpm_jax import data
  >>> data_dir = tempfile.mkdtemp()
  >>> data.dataset_info('digits', data_dir=data_dir).num_train
  1437
  >>> batch = next(data.train_iterator(
  ...     'digits', batch_size=8, seed=0, data_dir=data_dir))
  >>> sorted(batch), batch['image'].shape
  (['image', 'label', 'mask'], (8, 8, 8, 1))
"""

from dpm_jax.data.pipeline import DATASETS
from dpm_jax.data.pipeline import DatasetInfo
from dpm_jax.data.pipeline import DatasetNotFoundError
from dpm_jax.data.pipeline import dataset_info
from dpm_jax.data.pipeline import eval_iterator
from dpm_jax.data.pipeline import train_iterator

__all__ = [
    'DATASETS',
    'DatasetInfo',
    'DatasetNotFoundError',
    'dataset_info',
    'eval_iterator',
    'train_iterator',
]
