"""SFP from scratch on the MNIST-1D CNN, to 10% of its FLOPs (the baseline of
configs/mnist1d_psap_scratch.py, with the same phases).

  python -m train.main --config=configs/mnist1d_sfp_scratch.py --workdir=runs/m1d_sfp0

Measured: see the README's results.
"""

import ml_collections

from configs import mnist1d_psap_scratch


def get_config() -> ml_collections.ConfigDict:
  """mnist1d_cnn / mnist1d, SFP from scratch to 10% FLOPs."""
  config = mnist1d_psap_scratch.get_config()
  config.pruning.method = 'sfp'
  config.pruning.removal = 'soft'
  return config
