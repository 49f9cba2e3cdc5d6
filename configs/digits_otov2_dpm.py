"""OTOv2 + self-rectifying (+SR) on the digits CNN, to 50% of its FLOPs.

  python -m train.main --config=configs/digits_otov2_dpm.py \\
      --workdir=runs/digits_otov2_dpm

As configs/digits_otov2_dpm_sp.py, with self-rectifying: a decaying channel whose pruning
looks like a mistake is released.
Measured: see the README's results.
"""

import ml_collections

from configs import digits_otov2_dpm_sp


def get_config() -> ml_collections.ConfigDict:
  """OTOv2 (dpm)."""
  config = digits_otov2_dpm_sp.get_config()
  config.pruning.removal = 'dpm'
  return config
