"""DepGraph with sparse learning + smooth pruning (+SP) on the MNIST-1D CNN, to 10% of its FLOPs.

  python -m train.main --config=configs/mnist1d_depgraph_sl_dpm_sp.py \\
      --workdir=runs/mnist1d_depgraph_sl_dpm_sp

As configs/mnist1d_dpm.py (pretraining, a 10-epoch prune phase, fine-tuning), but the
pruning is DepGraph with sparse learning: group lasso with DepGraph's per-channel
strengths (reg 5e-4, alpha 16) from the start of the phase, then 5 global group-L2 events
from epoch 1 to epoch 5 while it goes on.
Measured: see the README's results.
"""

import ml_collections

from configs import mnist1d_dpm


def get_config() -> ml_collections.ConfigDict:
  """DepGraph with sparse learning (dpm_sp) to 10% FLOPs."""
  config = mnist1d_dpm.get_config()
  pruning = config.pruning
  pruning.method = 'depgraph'
  pruning.sparse_learning = True
  pruning.reg = 5e-4
  pruning.alpha = 16.0
  pruning.start_epoch = 1.0
  pruning.end_epoch = 5.0
  pruning.num_events = 5
  pruning.removal = 'dpm_sp'
  pruning.decay_steps = 40
  return config
