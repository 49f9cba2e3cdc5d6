"""SFP (soft filter pruning) on the pretrained MNIST-1D CNN, to 10% of its FLOPs.

  python -m train.main --config=configs/mnist1d_sfp.py --workdir=runs/mnist1d_sfp

Pretrains the 1D CNN as configs/mnist1d.py does (40 epochs), then prunes for 10 epochs:
at the start and after every epoch the filters with the lowest weight L2 norm of every
layer are zeroed at one ratio for all layers (to 10% of the FLOPs), keep training and may
regrow; the last selection is cut by surgery and the network fine-tuned for 20 epochs.
Measured: see the README's results.
"""

import ml_collections

from configs import mnist1d_dpm


def get_config() -> ml_collections.ConfigDict:
  """mnist1d_cnn / mnist1d, SFP to 10% FLOPs."""
  config = mnist1d_dpm.get_config()
  pruning = config.pruning
  pruning.method = 'sfp'
  pruning.removal = 'soft'
  pruning.start_epoch = 0.0
  pruning.end_epoch = pruning.epochs  # The last event at the end of the phase.
  pruning.interval_epochs = 1.0
  return config
