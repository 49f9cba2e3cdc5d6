"""Soft filter pruning (SFP) on the digits CNN, to 50% of its FLOPs.

  python -m train.main --config=configs/digits_sfp.py --workdir=runs/digits_sfp

Pretrains the digits CNN (10 epochs, as configs/digits.py), then prunes for 8 epochs: at
the start and after every epoch the lowest-L2 filters of every layer are zeroed, the same
fraction of each, so that the network keeps 50% of its FLOPs; zeroed filters keep training
and may regrow, and every event selects afresh. The last selection (after the last epoch) is
made final, the channels are removed by surgery and the network is fine-tuned for 10
epochs. Writes report.md, decay.png (zeroed filters regrowing) and widths.png.
Measured: see the README's results.
"""

import ml_collections

from configs import digits_dpm


def get_config() -> ml_collections.ConfigDict:
  """digits_cnn / digits, SFP to 50% FLOPs."""
  config = digits_dpm.get_config()
  pruning = config.pruning
  pruning.method = 'sfp'
  pruning.removal = 'soft'
  pruning.epochs = 8.0
  pruning.start_epoch = 0.0
  pruning.end_epoch = 8.0  # The end of the phase: the last event is at its last step.
  pruning.interval_epochs = 1.0
  return config
