"""A tiny DepGraph + DPM run on the digits: tests, and a first check of a multi-device setup.

  python -m train.main --config=configs/test_dpm.py --workdir=/tmp/dpm_jax_test_dpm

The narrow CNN of configs/test.py, trained for an epoch (44 steps of 32), pruned to 50%
of its FLOPs in 2 events over a quarter of an epoch while selected channels decay over 8
steps (self-rectifying may release them), then fine-tuned for a quarter of an epoch.
Measured on 2 CPU cores: about 20 s, start-up and compilation included; the accuracy is not
the point. The same run on 8 devices of one process, or on two processes of 4 devices each,
takes the same pruning decisions (tests/parallel_test.py):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m train.main --config=configs/test_dpm.py --workdir=/tmp/dpm_jax_8
"""

import ml_collections

from configs import test


def get_config() -> ml_collections.ConfigDict:
  """A few steps of DepGraph + DPM on the narrow digits CNN."""
  config = test.get_config()
  config.batch_size = 32  # Splits evenly over 1, 2, 4 or 8 devices.
  config.num_epochs = 1  # 44 steps.
  config.eval_batch_size = 120  # 3 batches for the 360 test images.
  config.log_every_steps = 4
  pruning = config.pruning
  pruning.enabled = True
  pruning.method = 'depgraph'
  pruning.removal = 'dpm'
  pruning.target_flops = 0.5
  pruning.epochs = 1.0  # 44 steps.
  pruning.start_epoch = 0.0
  pruning.end_epoch = 0.25
  pruning.num_events = 2
  pruning.decay_steps = 8
  pruning.min_decay_steps = 2
  pruning.cooldown = 8
  pruning.learning_rate = 0.01
  pruning.record_every_steps = 2
  pruning.finetune_epochs = 0.25
  return config
