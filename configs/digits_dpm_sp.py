"""DepGraph + smooth pruning only (DPM's "+SP" row) on the digits CNN.

  python -m train.main --config=configs/digits_dpm_sp.py --workdir=runs/digits_dpm_sp

As configs/digits_dpm.py, without self-rectifying. Same time.
"""

import ml_collections

from configs import digits_dpm


def get_config() -> ml_collections.ConfigDict:
  """digits_cnn / digits, DepGraph + SP to 50% FLOPs."""
  config = digits_dpm.get_config()
  config.pruning.removal = 'dpm_sp'
  return config
