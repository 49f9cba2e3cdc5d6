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

from configs import digits_dpm
from configs import digits_vit


def get_config() -> ml_collections.ConfigDict:
  """digits_vit / digits, DepGraph + DPM to 50% FLOPs."""
  config = digits_vit.get_config()
  # The demo's schedule (configs/digits_dpm.py), at the ViT's Adam learning rate.
  config.pruning = digits_dpm.get_config().pruning
  config.pruning.learning_rate = 1e-3
  config.pruning.finetune_learning_rate = 1e-3
  return config
