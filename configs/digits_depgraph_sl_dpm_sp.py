"""DepGraph with sparse learning + smooth pruning (+SP) on the digits CNN, to 50% of its FLOPs.

  python -m train.main --config=configs/digits_depgraph_sl_dpm_sp.py \\
      --workdir=runs/digits_depgraph_sl_dpm_sp

As configs/digits_depgraph_sl_hard.py, with smooth pruning: a channel the base would
remove at once decays to zero over decay_steps steps.
Measured: see the README's results.
"""

import ml_collections

from configs import digits_depgraph_sl_hard


def get_config() -> ml_collections.ConfigDict:
  """DepGraph with sparse learning (dpm_sp)."""
  config = digits_depgraph_sl_hard.get_config()
  config.pruning.removal = 'dpm_sp'
  config.pruning.decay_steps = 44
  return config
