"""DepGraph with sparse learning on ResNet-56 / CIFAR-10 to 47% of its FLOPs: the DPM
paper's main DepGraph row.

  python -m train.main --config=configs/cifar10_resnet56_depgraph_sl.py \\
      --workdir=runs/r56_depgraph_sl --config.data_dir=/path/to/tensorflow_datasets

Pretrains ResNet-56 (configs/cifar10_resnet56.py), then a 150-epoch prune phase: 100
epochs of sparse learning (group lasso with DepGraph's strengths, reg 5e-4, alpha 16), then
5 global group-L2 events to epoch 120 while it goes on; surgery; 100 epochs of fine-tuning.
+SP and +SR: `--config.pruning.removal=dpm_sp` or `=dpm`. Published (the DPM paper):
93.84 / 93.96 / 94.13 at 46.86 / 46.32 / 45.80% of the FLOPs. Not measured here.
"""

import ml_collections

from configs import cifar10_resnet56_dpm


def get_config() -> ml_collections.ConfigDict:
  """ResNet-56 / CIFAR-10, DepGraph with sparse learning to 47% FLOPs."""
  config = cifar10_resnet56_dpm.get_config()
  pruning = config.pruning
  pruning.removal = 'hard'
  pruning.sparse_learning = True
  pruning.reg = 5e-4
  pruning.alpha = 16.0
  pruning.epochs = 150.0
  pruning.start_epoch = 100.0
  pruning.end_epoch = 120.0
  return config
