"""DepGraph + DPM on the digits vision transformer: heads and MLP units to 50% FLOPs.

  python -m train.main --config=configs/digits_vit_dpm.py --workdir=runs/digits_vit_dpm

Pretrains the digits ViT (configs/digits_vit.py), then prunes whole attention heads and MLP
units (the residual stream stays whole: LayerNorm mixes it) to 50% of the FLOPs in 5
global group-L2 events while selected heads and units decay over one epoch and the
self-rectifying test may release them; makes the pruning final, removes the heads and
units by surgery (the blocks' head counts follow) and fine-tunes. Writes report.md and
its plots into the workdir. Expected: see the README's transformer section.
"""

import ml_collections

from configs import digits_vit


def get_config() -> ml_collections.ConfigDict:
  """digits_vit / digits, DepGraph + DPM to 50% FLOPs."""
  config = digits_vit.get_config()
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
  pruning.learning_rate = 1e-3
  pruning.lr_schedule = 'constant'
  pruning.record_every_steps = 2
  pruning.finetune_epochs = 10.0
  pruning.finetune_learning_rate = 1e-3
  return config
