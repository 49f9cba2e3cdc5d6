"""DepGraph with its own one-step removal (the base method) on the MNIST-1D CNN, to 10% FLOPs.

  python -m train.main --config=configs/mnist1d_hard.py --workdir=runs/mnist1d_hard

As configs/mnist1d_dpm.py, but selected channels are zeroed at once. Measured (the
README's methods matrix, seeds 0, 1 and 2): 94.3 +- 0.5 test accuracy after pruning and
surgery, 95.8 +- 0.3 fine-tuned, at 0.099 of the dense FLOPs; about 30 s per run on 2 CPU
cores.
"""

import ml_collections

from configs import mnist1d_dpm


def get_config() -> ml_collections.ConfigDict:
  """mnist1d_cnn / mnist1d, DepGraph (hard removal) to 10% FLOPs."""
  config = mnist1d_dpm.get_config()
  config.pruning.removal = 'hard'
  return config
