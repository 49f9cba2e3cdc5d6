"""ResNet-56 on CIFAR-10, DepGraph's dense recipe (the base network its pruning starts from).

SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 128, 200 epochs, lr / 10 at epochs
120, 150 and 180 (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023;
Torch-Pruning's benchmarks/main.py --mode pretrain).

  python -m train.main --config=configs/cifar10_resnet56.py --workdir=runs/cifar10_resnet56 \\
      --config.data_dir=/path/to/tensorflow_datasets

Expected (published, not measured here: no CIFAR-10 or GPU was available when this was
written): about 93.4% test accuracy (DepGraph reports 93.53% for its dense ResNet-56);
roughly 1 to 1.5 hours on one modern GPU (390 steps per epoch), far too slow for CPUs.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """ResNet-56 / CIFAR-10."""
  config = default.get_config()
  config.model = 'resnet56'
  config.dataset = 'cifar10'
  config.optimizer = 'sgd'
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.lr_schedule = 'piecewise'
  config.lr_milestones = (120, 150, 180)
  config.batch_size = 128
  config.num_epochs = 200
  return config
