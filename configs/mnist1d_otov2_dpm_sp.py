"""OTOv2 + smooth pruning (+SP) on the MNIST-1D CNN, to 10% of its FLOPs.

  python -m train.main --config=configs/mnist1d_otov2_dpm_sp.py \\
      --workdir=runs/mnist1d_otov2_dpm_sp

As configs/mnist1d_otov2_hard.py, with smooth pruning: a channel the base would remove at
once decays to zero over decay_steps steps.
Measured: see the README's results.
"""

import ml_collections

from configs import mnist1d_otov2_hard


def get_config() -> ml_collections.ConfigDict:
  """OTOv2 (dpm_sp)."""
  config = mnist1d_otov2_hard.get_config()
  config.pruning.removal = 'dpm_sp'
  config.pruning.decay_steps = 40
  return config
