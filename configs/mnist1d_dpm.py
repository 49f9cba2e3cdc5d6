"""DepGraph + DPM (smooth pruning and self-rectifying) on the MNIST-1D CNN, to 10% FLOPs.

  python -m train.main --config=configs/mnist1d_dpm.py --workdir=runs/mnist1d_dpm

Pretrains the 1D CNN as configs/mnist1d.py does (40 epochs), prunes it to 10% of its
FLOPs in 5 global group-L2 events over 5 epochs while selected channels decay over one
epoch (40 steps) and the self-rectifying test may release them, makes the pruning final,
removes the channels by surgery and fine-tunes for 20 epochs. Writes report.md,
decay.png and widths.png into the workdir.

Measured on 2 busy CPU cores, test accuracy for seeds 0, 1 and 2 (`--config.seed=N`),
at 0.097 to 0.100 of the dense FLOPs (dense: 0.974, 0.968, 0.971):

  removal                     after pruning and surgery   fine-tuned           mean
  dpm (this config)           0.953  0.953  0.942         0.973  0.970  0.959  0.967
  dpm_sp (mnist1d_dpm_sp.py)  0.904  0.930  0.925         0.943  0.957  0.951  0.950
  hard (mnist1d_hard.py)      0.948  0.925  0.925         0.958  0.956  0.945  0.953

Self-rectifying released 41, 34 and 38 channels; surgery was exact to 6e-6 (max abs
output difference). About 2 to 2.5 min wall time per run.
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
