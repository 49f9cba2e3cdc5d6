"""PSAP from scratch on the MNIST-1D CNN, to 10% of its FLOPs: no pretrained network.

  python -m train.main --config=configs/mnist1d_psap_scratch.py --workdir=runs/m1d_psap0

No dense pretrain phase: the prune phase trains the 1D CNN from its random initialisation
for 40 epochs (the dense config's learning rate and schedule) while PSAP prunes it softly
after every epoch; the last selection is cut by surgery and fine-tuned for 20 epochs.
configs/mnist1d_sfp_scratch.py is the same with SFP. Measured: see the README's results.
"""

import ml_collections

from configs import mnist1d_psap


def get_config() -> ml_collections.ConfigDict:
  """mnist1d_cnn / mnist1d, PSAP from scratch to 10% FLOPs."""
  config = mnist1d_psap.get_config()
  config.num_epochs = 0  # No pretraining.
  pruning = config.pruning
  pruning.epochs = 40.0
  pruning.end_epoch = 40.0
  pruning.learning_rate = config.learning_rate
  pruning.lr_schedule = config.lr_schedule
  return config
