"""DepGraph with sparse learning (the base method) on the digits CNN, to 50% of its FLOPs.

  python -m train.main --config=configs/digits_depgraph_sl_hard.py \\
      --workdir=runs/digits_depgraph_sl_hard

As configs/digits_dpm.py (pretraining, an 8-epoch prune phase, fine-tuning), but the
pruning is DepGraph with sparse learning: group lasso with DepGraph's per-channel
strengths (reg 5e-4, alpha 16) from the start of the phase, then 5 global group-L2 events
from epoch 2 to epoch 4 while it goes on.
Measured: see the README's results.
"""

import ml_collections

from configs import digits_dpm


def get_config() -> ml_collections.ConfigDict:
  """DepGraph with sparse learning (hard) to 50% FLOPs."""
  config = digits_dpm.get_config()
  pruning = config.pruning
  pruning.method = 'depgraph'
  pruning.sparse_learning = True
  pruning.reg = 5e-4
  pruning.alpha = 16.0
  pruning.start_epoch = 2.0
  pruning.end_epoch = 4.0
  pruning.num_events = 5
  pruning.removal = 'hard'
  return config
