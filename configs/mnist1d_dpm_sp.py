"""DepGraph + smooth pruning only (DPM's "+SP" row) on the MNIST-1D CNN, to 10% FLOPs.

  python -m train.main --config=configs/mnist1d_dpm_sp.py --workdir=runs/mnist1d_dpm_sp

As configs/mnist1d_dpm.py, without self-rectifying. Measured (the README's methods
matrix, seeds 0, 1 and 2): 93.8 +- 1.2 test accuracy after pruning and surgery, 95.6 +- 1.2
fine-tuned, at 0.099 of the dense FLOPs; about 30 s per run on 2 CPU cores.
"""

import ml_collections

from configs import mnist1d_dpm


def get_config() -> ml_collections.ConfigDict:
  """mnist1d_cnn / mnist1d, DepGraph + SP to 10% FLOPs."""
  config = mnist1d_dpm.get_config()
  config.pruning.removal = 'dpm_sp'
  return config
