"""A whole run: validate the config, pretrain, then the pruning phases.

`train_and_evaluate` strings the phases together: 'pretrain' (dense training,
`train.loop.train_phase`), then, when `config.pruning.enabled`, those of
`train.pruning.run` (prune-train, finalize, surgery, fine-tune, export, report).

Every phase trains data-parallel on a mesh over all devices of all processes
(`config.mesh`, see `train.parallel`); on one device that is the single-device program.

Files written into `workdir` (by process 0; checkpoints by all, as orbax does):
  config.json      the config of the latest run
  metrics.jsonl    one JSON object per logged step and per epoch (see `loop.MetricsWriter`)
  events.out.tfevents.*  the same numbers for TensorBoard (`tensorboard --logdir workdir`)
  <phase>/         orbax checkpoints of the phase's `TrainState` and `arch.json`
"""

from collections.abc import Iterable
import math
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
from dpm_jax import recipes
from train import loop
from train import parallel
from train import pruning
from train import timing


def _invalid(field: str, value: Any, requirement: str) -> loop.ConfigError:
  return loop.ConfigError(
      f'config.{field}={value!r} {requirement}. Change it in the config file or with '
      f'--config.{field}=...'
  )


def _check_choice(field: str, value: Any, choices: Iterable[str]) -> None:
  if value not in choices:
    raise _invalid(field, value, f'is unknown; valid choices: {", ".join(sorted(choices))}')


def _in_range(
    value: Any,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> bool:
  """Whether `value` is a finite number (an int if `integer`) in the range."""
  return (
      not isinstance(value, bool)
      and isinstance(value, int if integer else (int, float))
      and math.isfinite(value)
      and (value > low if low_open else value >= low)
      and (value < high if high_open else value <= high)
  )


def _check_number(
    field: str,
    value: Any,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
  """Raises ConfigError unless `value` is a finite number (an int if `integer`) in the range."""
  if _in_range(value, low, high, low_open=low_open, high_open=high_open, integer=integer):
    return
  kind = 'an int' if integer else 'a number'
  if high == math.inf:
    requirement = f'must be {kind} {">" if low_open else ">="} {low:g}'
  else:
    left, right = '(' if low_open else '[', ')' if high_open else ']'
    requirement = f'must be {kind} in {left}{low:g}, {high:g}{right}'
  raise _invalid(field, value, requirement)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises `loop.ConfigError` for a field that a run cannot use, before any work.

  Checks names (model, dataset, optimizer, schedules, pruning method), numbers
  (positive learning rates, sizes and intervals, fractions within their range)
  and, with pruning, the fields of the run around the recipe; the recipe's own
  options are checked by `pruning.validate_pruning_config`, which needs the
  dataset's size.
  """
  c = config
  _check_choice('model', c.model, models.MODELS)
  _check_choice('dataset', c.dataset, data.DATASETS)
  _check_choice('optimizer', c.optimizer, loop.OPTIMIZERS)
  _check_choice('lr_schedule', c.lr_schedule, loop.LR_SCHEDULES)
  _check_number('seed', c.seed, 0, integer=True)
  _check_number('learning_rate', c.learning_rate, 0, low_open=True)
  _check_number('momentum', c.momentum, 0, 1, high_open=True)
  _check_number('adam_b1', c.adam_b1, 0, 1, high_open=True)
  _check_number('adam_b2', c.adam_b2, 0, 1, high_open=True)
  _check_number('weight_decay', c.weight_decay, 0)
  if not all(_in_range(m, 0) for m in c.lr_milestones):
    raise _invalid('lr_milestones', c.lr_milestones, 'must be epochs: numbers >= 0')
  _check_number('lr_decay_factor', c.lr_decay_factor, 0, low_open=True)
  _check_number('warmup_epochs', c.warmup_epochs, 0)
  _check_number('num_epochs', c.num_epochs, 0)
  for field in ('batch_size', 'eval_batch_size', 'eval_every_epochs', 'log_every_steps',
                'checkpoint_every_epochs'):
    _check_number(field, c[field], 1, integer=True)
  if c.checkpoint_max_to_keep is not None:
    _check_number('checkpoint_max_to_keep', c.checkpoint_max_to_keep, 1, integer=True)
  if not isinstance(c.state_axis, str):
    raise _invalid('state_axis', c.state_axis, "must be a mesh axis name, or '' to replicate")
  if not isinstance(c.get('compilation_cache', ''), str):
    raise _invalid('compilation_cache', c.compilation_cache,
                   "must be a directory path, or '' for no cache")
  pruning_enabled = 'pruning' in c and c.pruning.enabled
  if c.num_epochs == 0 and not pruning_enabled:
    raise _invalid('num_epochs', 0, 'must be positive (0 is allowed only with pruning: '
                   'pruning from scratch, without a dense pretrain phase)')
  if not pruning_enabled:
    return
  p = c.pruning
  _check_choice('pruning.method', p.method, recipes.PRESETS)
  _check_number('pruning.target_flops', p.target_flops, 0, 1, low_open=True)
  _check_number('pruning.epochs', p.epochs, 0, low_open=True)
  _check_number('pruning.learning_rate', p.learning_rate, 0, low_open=True)
  _check_choice('pruning.lr_schedule', p.lr_schedule, loop.LR_SCHEDULES)
  _check_number('pruning.record_every_steps', p.record_every_steps, 1, integer=True)
  _check_number('pruning.finetune_epochs', p.finetune_epochs, 0)
  _check_number('pruning.finetune_learning_rate', p.finetune_learning_rate, 0, low_open=True)
  _check_choice('pruning.finetune_lr_schedule', p.finetune_lr_schedule, loop.LR_SCHEDULES)


def create_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The mesh of `config.mesh` over every device; `loop.ConfigError` when it cannot be
  built or cannot split the batches of `config` evenly."""
  try:
    mesh = parallel.create_mesh(config.mesh)
  except (TypeError, ValueError) as e:
    raise _invalid('mesh', config.mesh, f'cannot be used: {e}') from e
  if config.state_axis and config.state_axis not in mesh.axis_names:
    raise _invalid('state_axis', config.state_axis,
                   f'is not an axis of config.mesh (axes: {", ".join(mesh.axis_names)})')
  for field in ('batch_size', 'eval_batch_size'):
    problem = parallel.check_divides(config[field], mesh)
    if problem:
      raise _invalid(field, config[field], problem)
  return mesh


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

  In a run of several processes (`parallel.initialize`), every process calls it with the
  same config and workdir; each reads its part of every batch.

  Raises:
    loop.ConfigError: a config field the run cannot use (before anything is written).
    loop.TrainingDivergedError: the training loss or state became non-finite; the
      phase's last good checkpoint is kept.
  """
  validate_config(config)
  mesh = create_mesh(config)
  prune = 'pruning' in config and config.pruning.enabled
  with timing.TIMINGS.section('data'):
    info = data.dataset_info(config.dataset, data_dir=config.data_dir)
  steps_per_epoch = info.num_train // config.batch_size
  if steps_per_epoch == 0:
    raise _invalid(
        'batch_size', config.batch_size, f'exceeds the {info.num_train} training examples of '
        f'{info.name}'
    )
  if prune:
    pruning.validate_pruning_config(config, steps_per_epoch)
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2, sort_keys=True))

  with timing.TIMINGS.section('model'):
    model = models.create_model(
        config.model,
        num_classes=info.num_classes,
        rngs=nnx.Rngs(config.seed),
        **config.model_kwargs.to_dict(),
    )
    arch = model.arch()
    graphdefs, params, batch_stats = loop.split_model(model)
  del model  # Its arrays are donated by the first train step.
  prune_plan, after_step = None, None
  if prune and config.num_epochs > 0:
    # The pruning step compiles in a background thread while pretraining runs, started
    # after the first pretrain step, whose own compile it would slow down.
    with timing.TIMINGS.section('trace groups'):
      prune_plan = pruning.plan(config, graphdefs, params, batch_stats, steps_per_epoch,
                                background=True, mesh=mesh)
    after_step = lambda step, state: prune_plan.train_step.start()
  logging.info(
      '%s on %s: %d parameters, %d steps per epoch; %d devices (mesh %s), %d processes.',
      config.model,
      config.dataset,
      sum(p.size for p in jax.tree.leaves(params)),
      steps_per_epoch,
      mesh.size,
      dict(mesh.shape),
      jax.process_count(),
  )
  writer = loop.MetricsWriter(workdir / loop.METRICS_FILENAME)

  if config.num_epochs == 0:  # Pruning from scratch: the initialisation is the "dense" model.
    state = loop.TrainState(jnp.zeros((), jnp.int32), params, batch_stats, optax.EmptyState())
    state = parallel.put(state, parallel.state_sharding(state, mesh, config.state_axis))
    test = loop.evaluate(loop.make_eval_step(graphdefs.eval, mesh), state.params,
                         state.batch_stats, loop.eval_batches(config, mesh=mesh))
    final = {'test_loss': test['loss'], 'test_accuracy': test['accuracy']}
  else:
    tx = loop.create_optimizer(config, steps_per_epoch)
    state = loop.create_train_state(params, batch_stats, tx, mesh=mesh,
                                    state_axis=config.state_axis)
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
        step_callback=after_step,
        mesh=mesh,
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
        prune_plan=prune_plan,
        mesh=mesh,
    )
  logging.info('Final: %s', ', '.join(
      f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}' for k, v in sorted(final.items())))
  return final
