"""Command line: trains and evaluates a model as a config file says.

  python -m train.main --config=configs/digits.py --workdir=runs/digits \
      --config.num_epochs=5

Started again with the same --workdir, a run resumes from its last checkpoint.

It trains on every device it sees (`config.mesh`). A run of several processes (hosts) starts
this same command in each, with --num_processes, --process_id and --coordinator_address
(host:port of process 0), or with --distributed where JAX finds them itself (Cloud TPU,
SLURM, Open MPI, Kubernetes); all share one --workdir. Two processes on one machine:

  python -m train.main --config=configs/digits_dpm.py --workdir=runs/two \
      --coordinator_address=localhost:12355 --num_processes=2 --process_id=0 &
  python -m train.main --config=configs/digits_dpm.py --workdir=runs/two \
      --coordinator_address=localhost:12355 --num_processes=2 --process_id=1

A config that cannot work (an unknown `--config.<field>`, a field out of range),
missing data, an unreadable checkpoint or a diverged training loss end the
program with a one-line message on stderr and a non-zero exit status: 2 for a
config, 1 for the others. At the end it logs where the time went (imports, data, each
phase's compile, steps, evaluation and checkpoints, surgery, export, report) and writes it
to `workdir/timings.json`.
"""

import time

_START = time.perf_counter()  # Before the imports, which the time breakdown counts.

# pylint: disable=g-import-not-at-top,wrong-import-position
from collections.abc import Sequence
import difflib
import gc
import json
import logging as std_logging
import os
import re
import sys
from typing import Any, NoReturn

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from dpm_jax import checkpoint
from dpm_jax import data
from train import loop
from train import parallel
from train import timing
from train import train

_IMPORTED = time.perf_counter()

FLAGS = flags.FLAGS

flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the architecture.')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.DEFINE_string('coordinator_address', None,
                    'A run of several processes: host:port of process 0 (default: '
                    '$JAX_COORDINATOR_ADDRESS, or detected by JAX).')
flags.DEFINE_integer('num_processes', None, 'A run of several processes: how many.')
flags.DEFINE_integer('process_id', None, 'A run of several processes: this one, 0 to '
                     'num_processes - 1.')
flags.DEFINE_bool('distributed', False,
                  'Join a run of several processes with what JAX detects of the cluster '
                  '(Cloud TPU, SLURM, Open MPI, Kubernetes); implied by the three flags above.')

# Libraries whose INFO messages (every checkpoint write, every dataset open) would bury ours.
_QUIET_PACKAGES = ('/orbax/', '/tensorflow_datasets/', '/grain/', '/jax/_src/xla_bridge')
# Errors whose message says what went wrong and what to do: a traceback would only hide it.
_RUN_ERRORS = (
    data.DatasetNotFoundError,
    checkpoint.CheckpointError,
    loop.TrainingDivergedError,
)


def _drop_library_info(record: std_logging.LogRecord) -> bool:
  return record.levelno >= std_logging.WARNING or not any(
      p in record.pathname for p in _QUIET_PACKAGES
  )


def _exit(message: str, status: int) -> NoReturn:
  print(message, file=sys.stderr)
  sys.exit(status)


def unknown_override(argv: Sequence[str]) -> str | None:
  """The message for the first `--config.<field>` in `argv` that the config file lacks.

  Names the field and the nearest valid names at its level; None when every
  override names a field (or the config file itself does not load).
  """
  path = None
  for i, arg in enumerate(argv):
    if re.match(r'--?config=', arg):
      path = arg.split('=', 1)[1]
    elif re.fullmatch(r'--?config', arg) and i + 1 < len(argv):
      path = argv[i + 1]
  if path is None:
    return None
  try:
    config = FLAGS['config'].parser.parse(path)  # Loads the file, as the flag does.
  except Exception:  # pylint: disable=broad-except  # The flag's own error is the one to show.
    return None
  for arg in argv:
    match = re.match(r'--?(?:no)?config\.([^=]+)', arg)
    if match is None:
      continue
    node: Any = config
    names = match.group(1).split('.')
    for depth, name in enumerate(names):
      keys = list(node.keys()) if hasattr(node, 'keys') else []
      if name in keys:
        node = node[name]
        continue
      field = '.'.join(['config', *names[: depth + 1]])
      parent = '.'.join(['config', *names[:depth]])
      if not keys:
        return f'{arg}: {parent} has no fields.'
      close = difflib.get_close_matches(name, keys, n=3, cutoff=0.6)
      hint = (
          f'did you mean {", ".join(f"{parent}.{k}" for k in close)}?'
          if close
          else f'the fields of {parent} are: {", ".join(sorted(keys))}.'
      )
      return f'{arg}: unknown field {field}; {hint}'
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; an unknown `--config.<field>` ends the program with one line."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError):
    message = unknown_override(argv)
    if message is None:
      raise
    _exit(f'FATAL Flags parsing error: {message}', 2)


def use_compilation_cache(directory: str) -> None:
  """Turns on JAX's persistent compilation cache in `directory` ('' leaves it off).

  Every compile of a run is cached, however short: the job's many small ones add up. A
  directory set in the environment (JAX_COMPILATION_CACHE_DIR) wins.
  """
  if not directory or jax.config.jax_compilation_cache_dir:
    return
  jax.config.update('jax_compilation_cache_dir', os.path.expanduser(directory))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  logging.get_absl_handler().addFilter(_drop_library_info)
  if FLAGS.distributed or any(
      FLAGS[name].value is not None
      for name in ('coordinator_address', 'num_processes', 'process_id')):
    parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  timing.TIMINGS.reset(_START)
  timing.TIMINGS.add('imports', _IMPORTED - _START)
  use_compilation_cache(FLAGS.config.get('compilation_cache', ''))
  with timing.TIMINGS.section('start JAX'):
    logging.info('JAX devices: %r (process %d of %d)', jax.devices(), jax.process_index(),
                 jax.process_count())
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except loop.ConfigError as e:
    _exit(f'Invalid config: {e}', 2)
  except _RUN_ERRORS as e:
    _exit(f'{type(e).__name__}: {e}', 1)
  logging.info('Where the time went:\n%s', timing.TIMINGS.table())
  if jax.process_index() == 0:
    path = f'{FLAGS.workdir}/timings.json'
    with open(path, 'w') as f:
      json.dump(timing.TIMINGS.as_dict(), f, indent=2)


def _main_then_exit(argv: list[str]) -> None:
  """`main`, then a quick exit: the objects left are moved out of the garbage collector's
  sight (`gc.freeze`), so that the interpreter's shutdown does not walk them all (about
  0.5 s after a digits run); they are still freed, and exit handlers still run."""
  main(argv)
  gc.freeze()


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(_main_then_exit, flags_parser=parse_flags)
