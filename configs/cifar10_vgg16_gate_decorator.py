"""Gate Decorator on VGG-16-BN / CIFAR-10 to 9.9% of its FLOPs: the DPM paper's Gate
Decorator row.

  python -m train.main --config=configs/cifar10_vgg16_gate_decorator.py \\
      --workdir=runs/vgg_gd --config.data_dir=/path/to/tensorflow_datasets

Pretrains VGG-16-BN (configs/cifar10_vgg16.py), then ticks of one epoch, each removing the
channels worth 0.5% of the remaining FLOPs by their accumulated Taylor scores, with a tock
of 10 epochs (L1 1e-3 on the gates) every 10 ticks, until 9.86% of the FLOPs remain (the
reference code's settings, as far as our readings go); surgery; 100 epochs of fine-tuning.
+SP and +SR: `--config.pruning.removal=dpm_sp` or `=dpm`. Published (the DPM paper):
91.50 / 91.58 / 91.74 at 9.86 / 9.88 / 9.79%. Not measured here: 0.5% a tick needs about
460 ticks, a long run even on a GPU; raise tick_fraction to shorten it.
"""

import ml_collections

from configs import cifar10_vgg16


def get_config() -> ml_collections.ConfigDict:
  """VGG-16-BN / CIFAR-10, Gate Decorator to 9.86% FLOPs."""
  config = cifar10_vgg16.get_config()
  pruning = config.pruning
  pruning.enabled = True
  pruning.method = 'gate_decorator'
  pruning.removal = 'hard'
  pruning.target_flops = 0.0986
  pruning.epochs = 1000.0
  pruning.start_epoch = 0.0
  pruning.end_epoch = 990.0
  pruning.tick_epochs = 1.0
  pruning.ticks_per_tock = 10
  pruning.tock_epochs = 10.0
  pruning.tick_fraction = 0.005
  pruning.gate_l1 = 1e-3
  pruning.decay_steps = 390
  pruning.cooldown = 390
  pruning.learning_rate = 0.01
  pruning.lr_schedule = 'constant'
  pruning.record_every_steps = 50
  pruning.finetune_epochs = 100.0
  pruning.finetune_learning_rate = 0.01
  pruning.finetune_lr_schedule = 'cosine'
  return config
