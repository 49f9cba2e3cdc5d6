"""PSAP on ResNet-56 / CIFAR-10 to 47% of its FLOPs (the budget of the DepGraph configs).

  python -m train.main --config=configs/cifar10_resnet56_psap.py --workdir=runs/r56_psap \\
      --config.data_dir=/path/to/tensorflow_datasets

Pretrains ResNet-56 as configs/cifar10_resnet56.py (200 epochs), then prunes softly for 100
epochs, an event (adaptive per-layer ratios, protective reconstruction) after every epoch,
the last at the end of the phase; the last selection is cut by surgery and the network
fine-tuned for 100 epochs. Needs CIFAR-10 prepared as array_record; not measured here (no
GPU, no CIFAR-10 on the development machine).
"""

import ml_collections

from configs import cifar10_resnet56_dpm


def get_config() -> ml_collections.ConfigDict:
  """ResNet-56 / CIFAR-10, PSAP to 47% FLOPs."""
  config = cifar10_resnet56_dpm.get_config()
  pruning = config.pruning
  pruning.method = 'psap'
  pruning.removal = 'protective'
  pruning.end_epoch = pruning.epochs  # The last event at the end of the phase.
  pruning.interval_epochs = 1.0
  return config
