"""DepGraph + DPM (smooth pruning and self-rectifying) on the digits CNN: the demo.

  python -m train.main --config=configs/digits_dpm.py --workdir=runs/digits_dpm

Pretrains the digits CNN (10 epochs), prunes it to 50% of its FLOPs in 5 global
group-L2 events over 4 epochs while selected channels decay over one epoch
(44 steps) and the self-rectifying test may release them, makes the pruning
final, removes the channels by surgery and fine-tunes for 10 epochs. Writes
report.md, decay.png, ratios.png and widths.png into the workdir. Measured: 0.986
test accuracy at 0.500 of the dense FLOPs (dense: 0.992; seed 0), 10 channels released
by self-rectifying (15 releases), in about 25 s on 2 CPU cores (15-20 s again with the
compilation cache). Variants: configs/digits_dpm_sp.py (+SP only), configs/digits_hard.py (the base
method).
"""

import ml_collections

from configs import digits


def get_config() -> ml_collections.ConfigDict:
  """digits_cnn / digits, DepGraph + DPM to 50% FLOPs."""
  config = digits.get_config()
  pruning = config.pruning
  pruning.enabled = True
  pruning.method = 'depgraph'
  pruning.removal = 'dpm'
  pruning.target_flops = 0.5
  pruning.epochs = 8.0  # 352 steps: events until epoch 4, decays finish by epoch 5.
  pruning.start_epoch = 0.0
  pruning.end_epoch = 4.0
  pruning.num_events = 5
  pruning.decay_steps = 44  # One epoch.
  pruning.min_decay_steps = 5
  pruning.cooldown = 44
  pruning.learning_rate = 0.01
  pruning.lr_schedule = 'constant'
  pruning.record_every_steps = 2
  pruning.finetune_epochs = 10.0
  pruning.finetune_learning_rate = 0.01
  return config
