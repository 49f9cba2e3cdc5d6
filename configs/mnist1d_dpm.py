"""DepGraph + DPM (smooth pruning and self-rectifying) on the MNIST-1D CNN, to 10% FLOPs.

  python -m train.main --config=configs/mnist1d_dpm.py --workdir=runs/mnist1d_dpm

Pretrains the 1D CNN as configs/mnist1d.py does (40 epochs), prunes it to 10% of its
FLOPs in 5 global group-L2 events over 5 epochs while selected channels decay over one
epoch (40 steps) and the self-rectifying test may release them, makes the pruning final,
removes the channels by surgery and fine-tunes for 20 epochs. Writes report.md,
decay.png and widths.png into the workdir.

Measured (the README's methods matrix, seeds 0, 1 and 2): 97.6 +- 0.5 test accuracy
fine-tuned at 0.097 of the dense FLOPs (dense 97.0 +- 0.4; DepGraph's hard removal, configs/
mnist1d_hard.py: 95.8 +- 0.3), 236 +- 12 releases; about 30 s per run on 2 CPU cores.
"""

import ml_collections

from configs import mnist1d


def get_config() -> ml_collections.ConfigDict:
  """mnist1d_cnn / mnist1d, DepGraph + DPM to 10% FLOPs."""
  config = mnist1d.get_config()
  pruning = config.pruning
  pruning.enabled = True
  pruning.method = 'depgraph'
  pruning.removal = 'dpm'
  pruning.target_flops = 0.1
  pruning.epochs = 10.0  # 400 steps: events until epoch 5, decays finish by epoch 6.
  pruning.start_epoch = 0.0
  pruning.end_epoch = 5.0
  pruning.num_events = 5
  pruning.decay_steps = 40  # One epoch.
  pruning.min_decay_steps = 5
  pruning.cooldown = 40
  pruning.learning_rate = 0.01
  pruning.lr_schedule = 'constant'
  pruning.record_every_steps = 2
  pruning.finetune_epochs = 20.0
  pruning.finetune_learning_rate = 0.01
  return config
