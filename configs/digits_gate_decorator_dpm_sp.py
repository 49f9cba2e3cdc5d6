"""Gate Decorator + smooth pruning (+SP) on the digits CNN, to 50% of its FLOPs.

  python -m train.main --config=configs/digits_gate_decorator_dpm_sp.py \\
      --workdir=runs/digits_gate_decorator_dpm_sp

As configs/digits_dpm.py (pretraining, an 8-epoch prune phase, fine-tuning), but the
pruning is Gate Decorator: Taylor scores of the BatchNorm gates accumulated over ticks of
a quarter epoch; each tick removes the least important channels worth 5% of the remaining
FLOPs (globally, raw scores, at least 10% of every layer kept) until the target; every 4
ticks a tock of half an epoch trains with L1 (1e-3) on the gates.
Measured: see the README's results.
"""

import ml_collections

from configs import digits_dpm


def get_config() -> ml_collections.ConfigDict:
  """Gate Decorator (dpm_sp) to 50% FLOPs."""
  config = digits_dpm.get_config()
  pruning = config.pruning
  pruning.method = 'gate_decorator'
  pruning.start_epoch = 0.0
  pruning.end_epoch = 6.0
  pruning.tick_epochs = 0.25
  pruning.ticks_per_tock = 4
  pruning.tock_epochs = 0.5
  pruning.tick_fraction = 0.05
  pruning.gate_l1 = 1e-3
  pruning.removal = 'dpm_sp'
  pruning.decay_steps = 22
  return config
