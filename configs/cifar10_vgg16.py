"""VGG-16 with BatchNorm on CIFAR-10, with the same recipe as ResNet-56 (DepGraph's).

SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 128, 200 epochs, lr / 10 at epochs
120, 150 and 180.

  python -m train.main --config=configs/cifar10_vgg16.py --workdir=runs/cifar10_vgg16 \\
      --config.data_dir=/path/to/tensorflow_datasets

Expected (published, not measured here: no CIFAR-10 or GPU was available when this was
written): about 93.5 to 94% test accuracy (VGG-16-BN on CIFAR-10 in the pruning
literature: 93.4% to 94.0%); roughly 1 hour on one modern GPU.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """VGG-16-BN / CIFAR-10."""
  config = default.get_config()
  config.model = 'vgg16_bn'
  config.dataset = 'cifar10'
  config.learning_rate = 0.1
  config.weight_decay = 5e-4
  config.lr_schedule = 'piecewise'
  config.lr_milestones = (120, 150, 180)
  config.batch_size = 128
  config.num_epochs = 200
  return config
