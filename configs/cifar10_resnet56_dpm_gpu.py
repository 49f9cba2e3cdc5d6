"""DepGraph + DPM on ResNet-56 / CIFAR-10 for a GPU: every pruned width a multiple of 8.

  python -m train.main --config=configs/cifar10_resnet56_dpm_gpu.py --workdir=runs/r56_gpu \\
      --config.data_dir=/path/to/tensorflow_datasets

`configs/cifar10_resnet56_dpm.py` with `pruning.round_to = 8`. GPU kernels (cuDNN's
convolutions, tensor cores) run fastest on channel counts in multiples of 8; a network
pruned to uneven widths can run no faster than the dense one even at half its FLOPs. The
allocation still meets the FLOPs target: every group keeps a multiple of 8 channels (or
all of them). On a TPU use 128, the width of its lanes. Not yet run here (no CIFAR data and
no accelerator on the development machine).
"""

import ml_collections

from configs import cifar10_resnet56_dpm


def get_config() -> ml_collections.ConfigDict:
  """ResNet-56 / CIFAR-10, DepGraph + DPM to 47% FLOPs, widths in multiples of 8."""
  config = cifar10_resnet56_dpm.get_config()
  config.pruning.round_to = 8
  return config
