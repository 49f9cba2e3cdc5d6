"""OTOv2 + smooth pruning (+SP) on the digits CNN, to 50% of its FLOPs.

  python -m train.main --config=configs/digits_otov2_dpm_sp.py \\
      --workdir=runs/digits_otov2_dpm_sp

As configs/digits_dpm.py (pretraining, an 8-epoch prune phase, fine-tuning), but the
pruning is OTOv2: after one epoch of warm-up the channels are partitioned by saliency (the
cosine of -x and -grad, and the inverse norm) into important and redundant ones, the
redundant share set by the target; redundant channels are pushed towards zero (lambda 1.0)
until the half-space projection (eps 0.9) removes them.
Measured: see the README's results.
"""

import ml_collections

from configs import digits_dpm


def get_config() -> ml_collections.ConfigDict:
  """OTOv2 (dpm_sp) to 50% FLOPs."""
  config = digits_dpm.get_config()
  pruning = config.pruning
  pruning.method = 'otov2'
  pruning.start_epoch = 1.0
  pruning.end_epoch = 1.0
  pruning.num_events = 1
  pruning.lmbda = 1.0
  pruning.eps = 0.9
  pruning.removal = 'dpm_sp'
  pruning.decay_steps = 44
  return config
