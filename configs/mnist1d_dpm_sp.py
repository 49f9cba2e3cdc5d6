"""DepGraph + smooth pruning only (DPM's "+SP" row) on the MNIST-1D CNN, to 10% FLOPs.

  python -m train.main --config=configs/mnist1d_dpm_sp.py --workdir=runs/mnist1d_dpm_sp

As configs/mnist1d_dpm.py, without self-rectifying. Measured on 2 busy CPU cores,
seeds 0, 1 and 2: test accuracy 0.904, 0.930, 0.925 after pruning and surgery, 0.943,
0.957, 0.951 fine-tuned (mean 0.950), at 0.098 to 0.100 of the dense FLOPs; 2.2 to
2.8 min wall time per run.
"""

import ml_collections

from configs import mnist1d_dpm


def get_config() -> ml_collections.ConfigDict:
  """mnist1d_cnn / mnist1d, DepGraph + SP to 10% FLOPs."""
  config = mnist1d_dpm.get_config()
  config.pruning.removal = 'dpm_sp'
  return config
