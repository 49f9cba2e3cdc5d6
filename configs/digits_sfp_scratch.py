"""SFP from scratch on the digits CNN, to 50% of its FLOPs (the baseline of
configs/digits_psap_scratch.py, with the same phases).

  python -m train.main --config=configs/digits_sfp_scratch.py --workdir=runs/digits_sfp0

Measured: see the README's results.
"""

import ml_collections

from configs import digits_psap_scratch


def get_config() -> ml_collections.ConfigDict:
  """digits_cnn / digits, SFP from scratch to 50% FLOPs."""
  config = digits_psap_scratch.get_config()
  config.pruning.method = 'sfp'
  config.pruning.removal = 'soft'
  return config
