"""OTOv2 + self-rectifying (+SR) on the MNIST-1D CNN, to 10% of its FLOPs.

  python -m train.main --config=configs/mnist1d_otov2_dpm.py \\
      --workdir=runs/mnist1d_otov2_dpm

As configs/mnist1d_dpm.py (pretraining, a 10-epoch prune phase, fine-tuning), but the
pruning is OTOv2: after one epoch of warm-up the channels are partitioned by saliency (the
cosine of -x and -grad, and the inverse norm) into important and redundant ones, the
redundant share set by the target; redundant channels are pushed towards zero (lambda 1.0)
until the half-space projection (eps 0.9) removes them.
Measured: see the README's results.
"""

import ml_collections

from configs import mnist1d_dpm


def get_config() -> ml_collections.ConfigDict:
  """OTOv2 (dpm) to 10% FLOPs."""
  config = mnist1d_dpm.get_config()
  pruning = config.pruning
  pruning.method = 'otov2'
  pruning.start_epoch = 1.0
  pruning.end_epoch = 1.0
  pruning.num_events = 1
  pruning.lmbda = 1.0
  pruning.eps = 0.9
  pruning.removal = 'dpm'
  pruning.decay_steps = 40
  return config
