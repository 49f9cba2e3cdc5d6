"""Command line: trains and evaluates a model as a config file says.

  python -m train.main --config=configs/digits.py --workdir=runs/digits \
      --config.num_epochs=5

Started again with the same --workdir, a run resumes from its last checkpoint.
"""

import logging as std_logging

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from train import train

FLAGS = flags.FLAGS

flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the architecture.')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)

# Libraries whose INFO messages (every checkpoint write, every dataset open) would bury ours.
_QUIET_PACKAGES = ('/orbax/', '/tensorflow_datasets/', '/grain/', '/jax/_src/xla_bridge')


def _drop_library_info(record: std_logging.LogRecord) -> bool:
  return record.levelno >= std_logging.WARNING or not any(
      p in record.pathname for p in _QUIET_PACKAGES
  )


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  logging.get_absl_handler().addFilter(_drop_library_info)
  logging.info('JAX devices: %r', jax.devices())
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
