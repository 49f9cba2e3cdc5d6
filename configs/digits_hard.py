"""DepGraph with its own one-step removal (the base method) on the digits CNN.

  python -m train.main --config=configs/digits_hard.py --workdir=runs/digits_hard

As configs/digits_dpm.py, but selected channels are zeroed at once. Same time.
"""

import ml_collections

from configs import digits_dpm


def get_config() -> ml_collections.ConfigDict:
  """digits_cnn / digits, DepGraph (hard removal) to 50% FLOPs."""
  config = digits_dpm.get_config()
  config.pruning.removal = 'hard'
  return config
