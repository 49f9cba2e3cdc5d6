"""PSAP from scratch on the digits CNN, to 50% of its FLOPs: no pretrained network.

  python -m train.main --config=configs/digits_psap_scratch.py --workdir=runs/digits_psap0

No dense pretrain phase: the prune phase trains the digits CNN from its random
initialisation for 15 epochs while PSAP prunes it softly after every epoch (adaptive
per-layer ratios, protective reconstruction), then the last selection is cut by surgery and
the network fine-tuned for 10 epochs. Measured: see the README's results.
"""

import ml_collections

from configs import digits_psap


def get_config() -> ml_collections.ConfigDict:
  """digits_cnn / digits, PSAP from scratch to 50% FLOPs."""
  config = digits_psap.get_config()
  config.num_epochs = 0  # No pretraining.
  pruning = config.pruning
  pruning.epochs = 15.0
  pruning.end_epoch = 15.0
  pruning.learning_rate = 0.05  # Training from scratch: the digits config's rate...
  pruning.lr_schedule = 'cosine'  # ... and schedule.
  return config
