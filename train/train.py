"""A whole run: validate the config, pretrain, then the pruning phases.

`train_and_evaluate` strings the phases together: 'pretrain' (dense training,
`train.loop.train_phase`), then, when `config.pruning.enabled`, those of
`train.pruning.run` (prune-train, finalize, surgery, fine-tune, export, report).

Files written into `workdir`:
  config.json      the config of the latest run
  metrics.jsonl    one JSON object per logged step and per epoch (see `loop.MetricsWriter`)
  <phase>/         orbax checkpoints of the phase's `TrainState` and `arch.json`
"""

from collections.abc import Iterable
import os
from typing import Any

from absl import logging
from etils import epath
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dpm_jax import data
from dpm_jax import models
from train import loop
from train import pruning

def _check_choice(field: str, value: Any, choices: Iterable[str]) -> None:
  choices = sorted(choices)
  if value not in choices:
    raise ValueError(f'Unknown config.{field} {value!r}; valid choices: {", ".join(choices)}.')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for a config that names unknown things, before any work."""
  _check_choice('model', config.model, models.MODELS)
  _check_choice('dataset', config.dataset, data.DATASETS)
  _check_choice('optimizer', config.optimizer, loop.OPTIMIZERS)
  _check_choice('lr_schedule', config.lr_schedule, loop.LR_SCHEDULES)
  for field in ('batch_size', 'eval_batch_size', 'log_every_steps', 'checkpoint_every_epochs'):
    if config[field] <= 0:
      raise ValueError(f'config.{field} must be positive, got {config[field]}.')
  pruning_enabled = 'pruning' in config and config.pruning.enabled
  if config.num_epochs < 0 or (config.num_epochs == 0 and not pruning_enabled):
    raise ValueError(
        f'config.num_epochs must be positive, got {config.num_epochs} (0 is allowed only '
        'with pruning: pruning from scratch, without a dense pretrain phase).'
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]
) -> dict[str, float]:
  """Trains the model of `config` and evaluates it; resumes from `workdir` if possible.

  Phases: 'pretrain' (dense training for `config.num_epochs` epochs; none when it is 0:
  pruning from scratch), then, when `config.pruning.enabled`, those of
  `train.pruning.run` (prune-train, finalize, surgery, fine-tune, export, report).

  Args:
    config: a config like `configs/default.py`.
    workdir: where checkpoints and metrics go; a run started again with the
      same workdir continues from its last checkpoint.

  Returns:
    The final metrics: 'test_accuracy', 'test_loss' (and 'train_loss',
    'train_accuracy' of the last epoch when it was trained in this call; with
    pruning, those of `train.pruning.run`).
  """
  validate_config(config)
  prune = 'pruning' in config and config.pruning.enabled
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2, sort_keys=True))

  info = data.dataset_info(config.dataset, data_dir=config.data_dir)
  steps_per_epoch = info.num_train // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(
        f'config.batch_size {config.batch_size} exceeds the {info.num_train} training '
        f'examples of {info.name}.'
    )
  if prune:
    pruning.validate_pruning_config(config, steps_per_epoch)
  model = models.create_model(
      config.model,
      num_classes=info.num_classes,
      rngs=nnx.Rngs(config.seed),
      **config.model_kwargs.to_dict(),
  )
  arch = model.arch()
  graphdefs, params, batch_stats = loop.split_model(model)
  del model  # Its arrays are donated by the first train step.
  logging.info(
      '%s on %s: %d parameters, %d steps per epoch.',
      config.model,
      config.dataset,
      sum(p.size for p in jax.tree.leaves(params)),
      steps_per_epoch,
  )
  writer = loop.MetricsWriter(workdir / loop.METRICS_FILENAME)

  if config.num_epochs == 0:  # Pruning from scratch: the initialisation is the "dense" model.
    state = loop.TrainState(jnp.zeros((), jnp.int32), params, batch_stats, optax.EmptyState())
    test = loop.evaluate(loop.make_eval_step(graphdefs.eval), params, batch_stats,
                         loop.eval_batches(config))
    final = {'test_loss': test['loss'], 'test_accuracy': test['accuracy']}
  else:
    tx = loop.create_optimizer(config, steps_per_epoch)
    state = loop.create_train_state(params, batch_stats, tx)
    state, final = loop.train_phase(
        'pretrain',
        state,
        graphdefs=graphdefs,
        tx=tx,
        num_steps=int(config.num_epochs * steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
        config=config,
        workdir=workdir,
        arch=arch,
        writer=writer,
        learning_rate_fn=loop.create_learning_rate_schedule(config, steps_per_epoch),
    )
  if prune:
    final = pruning.run(
        config,
        workdir,
        state,
        graphdefs=graphdefs,
        steps_per_epoch=steps_per_epoch,
        writer=writer,
        dense_metrics=final,
    )
  logging.info('Final: %s', ', '.join(f'{k}={v:.4f}' for k, v in sorted(final.items())))
  return final
