"""OTOv2 on VGG-16-BN / CIFAR-10 to 26.5% of its FLOPs: the DPM paper's OTOv2 row.

  python -m train.main --config=configs/cifar10_vgg16_otov2.py --workdir=runs/vgg_otov2 \\
      --config.data_dir=/path/to/tensorflow_datasets

Pretrains VGG-16-BN (configs/cifar10_vgg16.py), then a 100-epoch prune phase: 10 epochs of
warm-up, the saliency partition, redundant channels pushed towards zero until the
half-space projection removes them; surgery; 100 epochs of fine-tuning. The paper's +SP
and +SR rows: `--config.pruning.removal=dpm_sp` or `=dpm`. Published (the DPM paper, FLOPs
remaining): 93.4 / 93.6 / 93.8 at 26.5 / 26.4 / 25.8%. Not measured here (no CIFAR-10 and
no GPU on the development machine).
"""

import ml_collections

from configs import cifar10_vgg16


def get_config() -> ml_collections.ConfigDict:
  """VGG-16-BN / CIFAR-10, OTOv2 to 26.5% FLOPs."""
  config = cifar10_vgg16.get_config()
  pruning = config.pruning
  pruning.enabled = True
  pruning.method = 'otov2'
  pruning.removal = 'hard'
  pruning.target_flops = 0.265
  pruning.epochs = 100.0
  pruning.start_epoch = 10.0  # Warm-up before the partition.
  pruning.end_epoch = 10.0
  pruning.num_events = 1
  pruning.lmbda = 1e-3
  pruning.eps = 0.9
  pruning.decay_steps = 390  # One epoch at batch 128 (+SP, +SR).
  pruning.cooldown = 390
  pruning.learning_rate = 0.01
  pruning.lr_schedule = 'constant'
  pruning.record_every_steps = 20
  pruning.finetune_epochs = 100.0
  pruning.finetune_learning_rate = 0.01
  pruning.finetune_lr_schedule = 'cosine'
  return config
