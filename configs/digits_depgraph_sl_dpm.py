"""DepGraph with sparse learning + self-rectifying (+SR) on the digits CNN, to 50% of its FLOPs.

  python -m train.main --config=configs/digits_depgraph_sl_dpm.py \\
      --workdir=runs/digits_depgraph_sl_dpm

As configs/digits_depgraph_sl_dpm_sp.py, with self-rectifying: a decaying channel whose
pruning looks like a mistake is released.
Measured: see the README's results.
"""

import ml_collections

from configs import digits_depgraph_sl_dpm_sp


def get_config() -> ml_collections.ConfigDict:
  """DepGraph with sparse learning (dpm)."""
  config = digits_depgraph_sl_dpm_sp.get_config()
  config.pruning.removal = 'dpm'
  return config
