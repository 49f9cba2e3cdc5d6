"""DepGraph with its own one-step removal (the base method) on the MNIST-1D CNN, to 10% FLOPs.

  python -m train.main --config=configs/mnist1d_hard.py --workdir=runs/mnist1d_hard

As configs/mnist1d_dpm.py, but selected channels are zeroed at once. Measured on 2 busy
CPU cores, seeds 0, 1 and 2: test accuracy 0.948, 0.925, 0.925 after pruning and
surgery, 0.958, 0.956, 0.945 fine-tuned (mean 0.953), at 0.097 to 0.100 of the dense
FLOPs; 2 to 2.3 min wall time per run.
"""

import ml_collections

from configs import mnist1d_dpm


def get_config() -> ml_collections.ConfigDict:
  """mnist1d_cnn / mnist1d, DepGraph (hard removal) to 10% FLOPs."""
  config = mnist1d_dpm.get_config()
  config.pruning.removal = 'hard'
  return config
