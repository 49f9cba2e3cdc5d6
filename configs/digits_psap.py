"""PSAP (protective self-adaptive pruning) on the pretrained digits CNN, to 50% of its FLOPs.

  python -m train.main --config=configs/digits_psap.py --workdir=runs/digits_psap

Pretrains the digits CNN (10 epochs, as configs/digits.py), then prunes for 8 epochs: at
the start and after every epoch each layer's ratio is set from its own weight sparsity and
its lowest-L2 filters are zeroed (soft: they keep training); a zeroed filter whose gradient
pulses above its peers' is restored from its saved weights and protected. The last selection
is made final, cut by surgery, and the network fine-tuned for 10 epochs. Writes report.md,
decay.png, ratios.png (each layer's ratio over the events) and widths.png.
Measured: see the README's results.
"""

import ml_collections

from configs import digits_sfp


def get_config() -> ml_collections.ConfigDict:
  """digits_cnn / digits, PSAP to 50% FLOPs."""
  config = digits_sfp.get_config()
  config.pruning.method = 'psap'
  config.pruning.removal = 'protective'
  return config
