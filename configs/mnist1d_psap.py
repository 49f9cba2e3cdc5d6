"""PSAP on the pretrained MNIST-1D CNN, to 10% of its FLOPs.

  python -m train.main --config=configs/mnist1d_psap.py --workdir=runs/mnist1d_psap

As configs/mnist1d_sfp.py, but every layer's ratio follows its own weight sparsity and
zeroed filters whose gradient pulses above their peers' are restored and protected.
Measured: see the README's results.
"""

import ml_collections

from configs import mnist1d_sfp


def get_config() -> ml_collections.ConfigDict:
  """mnist1d_cnn / mnist1d, PSAP to 10% FLOPs."""
  config = mnist1d_sfp.get_config()
  config.pruning.method = 'psap'
  config.pruning.removal = 'protective'
  return config
