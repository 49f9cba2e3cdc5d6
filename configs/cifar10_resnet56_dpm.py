"""DepGraph + DPM on ResNet-56 / CIFAR-10, to about 47% of the FLOPs (DepGraph's 2.11x).

  python -m train.main --config=configs/cifar10_resnet56_dpm.py --workdir=runs/r56_dpm \\
      --config.data_dir=/path/to/tensorflow_datasets

The setting of the DPM paper's ResNet-56 rows (DepGraph without sparse learning: base
method 93.32 at 47.2% FLOPs, +SP 93.62, +SR 93.71; dense 93.53): pretrain 200 epochs,
then 100 epochs of pruning at lr 0.01 with 5 global group-L2 events over the first 50,
selected channels decaying over one epoch (390 steps), then 100 epochs of fine-tuning.
Not yet run here (no CIFAR data and no accelerator on the development machine): about
a day on one GPU. `--config.pruning.removal=hard` / `dpm_sp` give the base and +SP rows.
"""

import ml_collections

from configs import cifar10_resnet56


def get_config() -> ml_collections.ConfigDict:
  """ResNet-56 / CIFAR-10, DepGraph + DPM to 47% FLOPs."""
  config = cifar10_resnet56.get_config()
  pruning = config.pruning
  pruning.enabled = True
  pruning.method = 'depgraph'
  pruning.removal = 'dpm'
  pruning.target_flops = 0.47
  pruning.epochs = 100.0
  pruning.start_epoch = 0.0
  pruning.end_epoch = 50.0
  pruning.num_events = 5
  pruning.decay_steps = 390  # One epoch at batch 128.
  pruning.cooldown = 390
  pruning.learning_rate = 0.01
  pruning.lr_schedule = 'constant'
  pruning.record_every_steps = 20
  pruning.finetune_epochs = 100.0
  pruning.finetune_learning_rate = 0.01
  pruning.finetune_lr_schedule = 'cosine'
  return config
