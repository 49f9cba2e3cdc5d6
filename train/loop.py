"""The training loop: pure steps, the optimizer, data streams and a checkpointed phase.

The model is used in flax NNX's functional style: `split_model` splits it once
into two graph definitions (train mode and eval mode; NNX records the mode in
the graph definition) and pure `params` / `batch_stats` dicts. `train_step` and
`eval_step` are pure functions over a `TrainState` pytree that `nnx.merge` the
model inside; `make_train_step` / `make_eval_step` jit them (the train step
donating its state). `train_phase` runs one phase (a number of steps with one
optimizer), checkpointing into `workdir/<phase>/` and resuming from there.

Given a `jax.sharding.Mesh` (see `train.parallel`), the same functions train data-parallel:
each batch is split over the devices, the state stays replicated (or split along
`config.state_axis`), and the steps run as one program over all devices and processes.
Without one, everything lives on the first local device.
"""

from collections.abc import Callable, Iterable, Iterator, Mapping
import functools
import json
import math
import os
import threading
import time
from typing import Any, NamedTuple, NoReturn

from absl import logging
from etils import epath
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from dpm_jax import checkpoint
from dpm_jax import data
from train import parallel
from train import tensorboard
from train import timing

PyTree = Any
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]

OPTIMIZERS = ('sgd', 'adam')
LR_SCHEDULES = ('constant', 'cosine', 'piecewise')
METRICS_FILENAME = 'metrics.jsonl'


class ConfigError(ValueError):
  """A config field that a run cannot use; the message names it and says what to do."""


class TrainingDivergedError(RuntimeError):
  """The training loss or the state became non-finite; no checkpoint of it was written."""


class TrainState(NamedTuple):
  """Everything that changes during training; a pytree that is checkpointed whole.

  Attributes:
    step: optimizer steps taken in the current phase (int32 scalar).
    params: the model's `nnx.Param` values as a pure nested dict.
    batch_stats: the model's `nnx.BatchStat` values (BatchNorm running
      statistics) as a pure nested dict; empty when the model has none.
    opt_state: the optax state of the phase's optimizer.
  """

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: optax.OptState


class GraphDefs(NamedTuple):
  """The model's static structure in train mode and in eval mode."""

  train: nnx.GraphDef
  eval: nnx.GraphDef


# ----------------------------------------------------------------------------
# Model, loss and the pure steps.


def split_model(model: nnx.Module) -> tuple[GraphDefs, PyTree, PyTree]:
  """Splits an NNX model into graph definitions and pure `params`, `batch_stats` dicts.

  Leaves the model in eval mode. The returned arrays are the model's own: once a
  train step donates them, the model must not be used any more (rebuild one with
  `nnx.merge`).

  Raises:
    ValueError: the model holds variables other than `nnx.Param` and
      `nnx.BatchStat` (e.g. dropout RNG state), which these steps do not thread.
  """
  model.train()
  train_def = nnx.graphdef(model)
  model.eval()
  eval_def, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  if jax.tree.leaves(rest):
    paths = ['/'.join(map(str, path)) for path, _ in nnx.to_flat_state(rest)]
    raise ValueError(
        'The model has variables other than nnx.Param and nnx.BatchStat, which the train '
        f'step does not carry: {paths}'
    )
  return GraphDefs(train_def, eval_def), nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)


def apply_model(
    graphdef: nnx.GraphDef, params: PyTree, batch_stats: PyTree, images: jax.Array
) -> tuple[jax.Array, PyTree]:
  """Runs the model; returns logits and the (in train mode, updated) batch stats."""
  model = nnx.merge(graphdef, params, batch_stats)
  logits = model(images)
  return logits, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def create_train_state(
    params: PyTree,
    batch_stats: PyTree,
    tx: optax.GradientTransformation,
    *,
    mesh: jax.sharding.Mesh | None = None,
    state_axis: str | None = None,
) -> TrainState:
  """A step-0 `TrainState` for `params` and a fresh state of optimizer `tx`.

  Its arrays are committed to the first local device, or with `mesh` placed on it as
  `parallel.state_sharding(state, mesh, state_axis)` says, as those of a restored
  checkpoint are, so that a phase started afresh and one resumed run the same compiled step.
  """
  state = TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      # One compile, rather than one per operation and shape (the zeros of every moment,
      # the pruning state's parts); the same values (tests/train_test.py checks every preset).
      opt_state=jax.jit(tx.init)(params),
  )
  if mesh is None:
    return jax.device_put(state, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  return parallel.put(state, parallel.state_sharding(state, mesh, state_axis))


def train_step(
    state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef, tx: optax.GradientTransformation
) -> tuple[TrainState, Metrics]:
  """One optimizer step on `batch` (pure; jit it with `make_train_step`).

  Args:
    state: the current train state.
    batch: {'image': float32 [B, H, W, C], 'label': int32 [B]}.
    graphdef: the model's train-mode graph definition (`GraphDefs.train`).
    tx: the optimizer whose state is `state.opt_state`.

  Returns:
    The new state and this batch's {'loss', 'accuracy'} (before the update).
  """

  def loss_fn(params):
    logits, batch_stats = apply_model(graphdef, params, state.batch_stats, batch['image'])
    return cross_entropy_loss(logits, batch['label']), (logits, batch_stats)

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label'])}
  return TrainState(state.step + 1, params, batch_stats, opt_state), metrics


def eval_step(
    params: PyTree, batch_stats: PyTree, batch: Batch, *, graphdef: nnx.GraphDef
) -> Metrics:
  """Summed loss, number correct and number of examples of `batch` (pure; see `make_eval_step`).

  Rows whose `batch['mask']` is 0 (padding of the last batch) are not counted.
  """
  logits, _ = apply_model(graphdef, params, batch_stats, batch['image'])
  mask = batch.get('mask', jnp.ones(logits.shape[:1], jnp.float32))
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
  correct = jnp.argmax(logits, -1) == batch['label']
  return {
      'loss_sum': jnp.sum(losses * mask),
      'correct': jnp.sum(correct * mask),
      'count': jnp.sum(mask),
  }


TrainStepFn = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
EvalStepFn = Callable[[PyTree, PyTree, Batch], Metrics]


def sharded_train_step(
    state: TrainState,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    state_axis: str | None = None,
) -> tuple[TrainState, Metrics]:
  """`train_step` on a batch split over `mesh`, the state kept where
  `parallel.state_sharding` puts it and the metrics replicated (pure; see `make_train_step`).

  The batch statistics, the loss and every pruning decision are computed on the global
  batch and state, so they are those of `train_step` on one device, up to the order of
  floating-point sums.
  """
  batch = jax.lax.with_sharding_constraint(batch, parallel.batch_sharding(mesh))
  state, metrics = train_step(state, batch, graphdef=graphdef, tx=tx)
  state = jax.lax.with_sharding_constraint(state, parallel.state_sharding(state, mesh, state_axis))
  return state, jax.lax.with_sharding_constraint(metrics, parallel.replicated(mesh))


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    mesh: jax.sharding.Mesh | None = None,
    state_axis: str | None = None,
) -> TrainStepFn:
  """`train_step` for one model and optimizer, jitted, donating the input state; with
  `mesh`, `sharded_train_step`.

  The graph definition and optimizer are bound rather than passed as static
  arguments: jit would hash the graph definition on every call (milliseconds
  for a ResNet-56).
  """
  if mesh is None:
    step = functools.partial(train_step, graphdef=graphdef, tx=tx)
  else:
    step = functools.partial(sharded_train_step, graphdef=graphdef, tx=tx, mesh=mesh,
                             state_axis=state_axis)
  return jax.jit(step, donate_argnums=0)


class BackgroundCompiledStep:
  """A jitted train step compiled in a background thread, ahead of the phase that runs it.

  `start` it when the main thread has no compiling of its own to do (XLA compiles contend:
  an eager model initialisation beside a compile runs several times slower), e.g. once the
  phase before has compiled its own step: XLA then compiles on another core while that phase
  trains, and the next phase does not wait (the pruning step takes several times longer to
  compile than a plain one). Called like the step: the first call waits for the compile;
  when it was never started, failed, or the inputs' shapes, dtypes or tree differ from the
  expected ones, the jitted step itself runs, compiling (or raising) as it would have.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> f = jax.jit(lambda x, b: (x + b['v'], {}))
    >>> step = BackgroundCompiledStep(f, jnp.zeros(3), {'v': jnp.ones(3)}).start()
    >>> step(jnp.zeros(3), {'v': jnp.ones(3)})[0].tolist()
    [1.0, 1.0, 1.0]
  """

  def __init__(self, step_fn: Any, state_like: PyTree, batch_like: PyTree):
    self.step_fn = step_fn
    self._avals = _avals((state_like, batch_like))
    self._compiled = None
    self._use = None
    self._thread = threading.Thread(
        target=self._compile, args=(state_like, batch_like), name='compile-train-step')

  def start(self) -> 'BackgroundCompiledStep':
    """Starts compiling (once); returns self."""
    if self._thread.ident is None:
      self._thread.start()
    return self

  def _compile(self, state_like: PyTree, batch_like: PyTree) -> None:
    try:
      self._compiled = self.step_fn.lower(state_like, batch_like).compile()
    except Exception:  # pylint: disable=broad-except  # The jitted step raises it again.
      logging.warning('Compiling the train step in the background failed; it compiles at '
                      'its first call instead.', exc_info=True)

  def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    if self._use is None:  # The first call: checked once, then trusted.
      if self._thread.ident is not None:
        self._thread.join()
      self._use = (self._compiled if self._compiled is not None
                   and _avals((state, batch)) == self._avals else self.step_fn)
    return self._use(state, batch)


def compile_step_ahead(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, params: PyTree,
    batch_stats: PyTree, batch: Batch, *, mesh: jax.sharding.Mesh | None = None,
    state_axis: str | None = None
) -> BackgroundCompiledStep:
  """`make_train_step(graphdef, tx, mesh=mesh, state_axis=state_axis)`, to compile in the
  background (`start` it) for a state made by `create_train_state` from arrays shaped like
  `params` and `batch_stats` (concrete or `jax.ShapeDtypeStruct`s) and batches shaped (and,
  with `mesh`, placed) like `batch`."""
  state_like = abstract_state(jax.eval_shape(
      lambda p, b: TrainState(jnp.zeros((), jnp.int32), p, b, tx.init(p)), params, batch_stats),
      mesh=mesh, state_axis=state_axis)
  batch_like = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=None if mesh is None else parallel.batch_sharding(mesh)),
      batch)
  step = make_train_step(graphdef, tx, mesh=mesh, state_axis=state_axis)
  return BackgroundCompiledStep(step, state_like, batch_like)


def _avals(tree: PyTree) -> tuple[Any, ...]:
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(x.shape), str(x.dtype), bool(getattr(x, 'weak_type', False)))
                        for x in leaves)


def abstract_state(state_shapes: PyTree, *, mesh: jax.sharding.Mesh | None = None,
                   state_axis: str | None = None) -> PyTree:
  """``state_shapes`` (e.g. from `jax.eval_shape`) placed as `create_train_state` places
  a state: on the first local device, or on `mesh`."""
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, state_shapes)
  else:
    shardings = parallel.state_sharding(state_shapes, mesh, state_axis)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s,
                                        weak_type=getattr(x, 'weak_type', False)),
      state_shapes, shardings)


def _sharded_eval_step(params: PyTree, batch_stats: PyTree, batch: Batch, *,
                       graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh) -> Metrics:
  batch = jax.lax.with_sharding_constraint(batch, parallel.batch_sharding(mesh))
  sums = eval_step(params, batch_stats, batch, graphdef=graphdef)
  return jax.lax.with_sharding_constraint(sums, parallel.replicated(mesh))


@functools.lru_cache(maxsize=8)
def make_eval_step(graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh | None = None) -> EvalStepFn:
  """`eval_step` for one model (its eval-mode graph definition), jitted; one per graph, so
  that phases evaluating the same model (pretrain and prune; after surgery and fine-tune)
  compile it once. With `mesh`, batches are split over it and the sums replicated."""
  if mesh is None:
    return jax.jit(functools.partial(eval_step, graphdef=graphdef))
  return jax.jit(functools.partial(_sharded_eval_step, graphdef=graphdef, mesh=mesh))


def evaluate(
    eval_step_fn: EvalStepFn, params: PyTree, batch_stats: PyTree, batches: Iterable[Batch]
) -> dict[str, float]:
  """Mean loss and accuracy over `batches` (one pass) with a `make_eval_step` function."""
  totals = None
  for batch in batches:
    sums = eval_step_fn(params, batch_stats, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError('No evaluation batches.')
  totals = jax.device_get(totals)
  return {
      'loss': float(totals['loss_sum'] / totals['count']),
      'accuracy': float(totals['correct'] / totals['count']),
  }


# ----------------------------------------------------------------------------
# Optimizer.


def create_learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
  """The learning rate per step for `config.num_epochs` epochs.

  A linear warmup from 0 over `config.warmup_epochs` is followed by
  `config.lr_schedule`: 'constant', 'cosine' (to 0 at the end of training) or
  'piecewise' (multiplied by `lr_decay_factor` at each epoch in
  `lr_milestones`; milestones count from the start of training, warmup included).
  """
  total_steps = int(config.num_epochs * steps_per_epoch)
  warmup_steps = int(config.warmup_epochs * steps_per_epoch)
  lr = config.learning_rate
  if config.lr_schedule == 'constant':
    main = optax.constant_schedule(lr)
  elif config.lr_schedule == 'cosine':
    main = optax.cosine_decay_schedule(lr, decay_steps=max(total_steps - warmup_steps, 1))
  elif config.lr_schedule == 'piecewise':
    boundaries = {
        int(m * steps_per_epoch) - warmup_steps: config.lr_decay_factor
        for m in config.lr_milestones
    }
    main = optax.piecewise_constant_schedule(lr, boundaries)
  else:
    raise ValueError(
        f'Unknown lr_schedule {config.lr_schedule!r}; valid: {", ".join(LR_SCHEDULES)}.'
    )
  if warmup_steps == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps])


def kernel_mask(params: PyTree) -> PyTree:
  """True for conv and dense kernels (ndim >= 2), False for biases and norm scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def create_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
  """The optimizer of `config`: weight decay, then SGD (momentum) or Adam.

  Weight decay is coupled L2 regularisation (`wd * w` added to the gradient
  before momentum/Adam, as PyTorch's `weight_decay` does) on kernels only:
  biases and BatchNorm scales/offsets are not decayed (see `kernel_mask`).
  """
  learning_rate = create_learning_rate_schedule(config, steps_per_epoch)
  if config.optimizer == 'sgd':
    opt = optax.sgd(learning_rate, momentum=config.momentum or None, nesterov=config.nesterov)
  elif config.optimizer == 'adam':
    opt = optax.adam(learning_rate, b1=config.adam_b1, b2=config.adam_b2)
  else:
    raise ValueError(f'Unknown optimizer {config.optimizer!r}; valid: {", ".join(OPTIMIZERS)}.')
  return optax.chain(optax.add_decayed_weights(config.weight_decay, mask=kernel_mask), opt)


# ----------------------------------------------------------------------------
# Data.


def train_batches(config: ml_collections.ConfigDict, start_step: int = 0, *,
                  mesh: jax.sharding.Mesh | None = None) -> Iterator[Batch]:
  """The endless, seeded training stream of `config`, from batch `start_step` on.

  With `mesh`, each process reads its part of every batch (`parallel.data_shard`) and the
  stream yields global arrays split over the mesh (`parallel.global_batch`): the same
  batches as without.
  """
  batches = data.train_iterator(
      config.dataset,
      batch_size=config.batch_size,
      seed=config.seed,
      data_dir=config.data_dir,
      augment=config.augment,
      start_step=start_step,
      **({} if mesh is None else {'shard': parallel.data_shard()}),
  )
  return batches if mesh is None else (parallel.global_batch(b, mesh) for b in batches)


def eval_batches(config: ml_collections.ConfigDict, *,
                 mesh: jax.sharding.Mesh | None = None) -> Iterator[Batch]:
  """One pass over the test split of `config.dataset` (split over `mesh` as `train_batches`
  splits the training batches)."""
  batches = data.eval_iterator(
      config.dataset, batch_size=config.eval_batch_size, data_dir=config.data_dir,
      **({} if mesh is None else {'shard': parallel.data_shard()}),
  )
  return batches if mesh is None else (parallel.global_batch(b, mesh) for b in batches)


# ----------------------------------------------------------------------------
# Metrics file and the phase loop.


class MetricsWriter:
  """Appends metric records to `metrics.jsonl` and to TensorBoard event files, and logs them.

  Each record has `phase`, `step` (optimizer steps in that phase), `epoch`
  (fractional), `time` (seconds of training in the phase, summed over resumed
  runs), `lr`, `train_loss` and `train_accuracy` (means since the previous
  record); records written at the end of an epoch also have `test_loss` and
  `test_accuracy`. A last line cut short (a run killed while writing it) is dropped.

  The event files (in the directory of `metrics.jsonl`, for `tensorboard --logdir`) hold
  every number of every record as the scalar `<phase>/<field>` at the record's `step` (0
  for records without one). They are written again from the records whenever records are
  dropped or replaced (a resumed run), so they always hold what `metrics.jsonl` holds.
  In a run of several processes only process 0 writes.
  """

  def __init__(self, path: str | os.PathLike[str]):
    self.path = epath.Path(path)
    self.primary = jax.process_index() == 0
    lines = self.path.read_text().splitlines() if self.path.exists() else []
    lines = [line for line in lines if line.strip()]
    self.records = []
    for i, line in enumerate(lines):
      try:
        self.records.append(json.loads(line))
      except json.JSONDecodeError:
        if i < len(lines) - 1:
          raise ValueError(f'{self.path}: line {i + 1} is not JSON: {line[:80]!r}') from None
        self._rewrite()
    self._events = None
    self._rewrite_events()

  def resume(self, phase: str, step: int) -> float:
    """Drops records of `phase` after `step` (written by a run killed before its
    next checkpoint); returns the phase's training time up to `step`."""
    self._keep(lambda r: r['phase'] != phase or r.get('step', 0) <= step)
    return max((r.get('time', 0.0) for r in self.records if r['phase'] == phase), default=0.0)

  def write(self, record: dict[str, Any], *, log_level: int = logging.INFO) -> None:
    self.records.append(record)
    if self.primary:
      with self.path.open('a') as f:
        f.write(json.dumps(record) + '\n')
      self._events.scalars(*_scalars(record))
    text = (f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in record.items())
    logging.log(log_level, '%s', ', '.join(text))

  def replace(self, record: dict[str, Any]) -> None:
    """Writes `record` in place of the records of its phase (e.g. the one final result of a
    run, written again when a finished run is started again)."""
    self._keep(lambda r: r['phase'] != record['phase'])
    self.write(record)

  def _keep(self, keep: Callable[[dict[str, Any]], bool]) -> None:
    kept = [r for r in self.records if keep(r)]
    if len(kept) != len(self.records):
      self.records = kept
      self._rewrite()

  def _rewrite(self) -> None:
    """Writes `records` to a temporary file and renames it: a kill leaves old or new whole."""
    if not self.primary:
      return
    tmp = self.path.parent / (self.path.name + '.tmp')
    tmp.write_text(''.join(json.dumps(r) + '\n' for r in self.records))
    tmp.replace(self.path)
    if getattr(self, '_events', None) is not None:
      self._rewrite_events()

  def _rewrite_events(self) -> None:
    """A new event file of all `records`, in place of the old ones."""
    if not self.primary:
      return
    old = list(self.path.parent.glob('events.out.tfevents.*'))
    self._events = tensorboard.EventWriter(self.path.parent)
    for record in self.records:
      self._events.scalars(*_scalars(record))
    for path in old:
      path.unlink()


def _scalars(record: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
  """The step and the TensorBoard scalars (`<phase>/<field>`) of a metrics record."""
  values = {f'{record["phase"]}/{k}': float(v) for k, v in record.items()
            if k not in ('phase', 'step') and isinstance(v, (int, float))
            and not isinstance(v, bool)}
  return int(record.get('step', 0)), values


def _mean_metrics(step_metrics: list[Metrics]) -> dict[str, float]:
  stacked = jax.device_get(step_metrics)
  return {k: float(sum(m[k] for m in stacked) / len(stacked)) for k in stacked[0]}


def train_phase(
    phase: str,
    state: TrainState,
    *,
    graphdefs: GraphDefs,
    tx: optax.GradientTransformation,
    num_steps: int,
    steps_per_epoch: int,
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike[str],
    arch: Mapping[str, Any],
    writer: MetricsWriter,
    learning_rate_fn: optax.Schedule | None = None,
    train_step_fn: TrainStepFn | None = None,
    step_callback: Callable[[int, TrainState], None] | None = None,
    on_resume: Callable[[int], None] | None = None,
    on_checkpoint: Callable[[int, TrainState], None] | None = None,
    record_extras: Callable[[TrainState], dict[str, Any]] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[TrainState, dict[str, float]]:
  """Trains `state` with `tx` for `num_steps` steps, checkpointing into `workdir/<phase>`.

  If that directory holds a checkpoint, training resumes from it (and the data
  stream from the same batch), so a killed run started again ends with the same
  state as one that was never interrupted. Checkpoints are written every
  `config.checkpoint_every_epochs` epochs and at the end; the test set is
  evaluated every `config.eval_every_epochs` epochs and at the end. Each metrics
  record is written before the checkpoint of its step, so a resumed run neither
  loses nor repeats one.

  The mean training loss is checked wherever it is fetched for a metrics record
  (every `config.log_every_steps` steps and at the end of each epoch), and the
  params and batch statistics before each checkpoint; when either is not finite
  the phase stops with `TrainingDivergedError`, leaving the checkpoints as they were.

  Args:
    phase: name of the phase; also the checkpoint subdirectory.
    state: the initial state (also the restore target: structure, shapes, dtypes).
    graphdefs: the model's graph definitions.
    tx: the optimizer of this phase (`state.opt_state` is its state).
    num_steps: length of the phase in optimizer steps.
    steps_per_epoch: optimizer steps per pass over the training set.
    config: batch sizes, data, logging and checkpoint settings.
    workdir: the run's directory.
    arch: the model's `arch()`, saved as JSON beside the checkpoints.
    writer: where metric records go.
    learning_rate_fn: the schedule inside `tx`, for logging only.
    train_step_fn: the jitted step to use; default: `make_train_step(graphdefs.train, tx)`.
    step_callback: called as `step_callback(step, state)` after every step (`step`:
      steps done); `state` is donated by the next step, so read it right away.
    on_resume: called once with the step the phase starts from (0 when fresh),
      e.g. to drop what a killed run recorded after its last checkpoint.
    on_checkpoint: called as `on_checkpoint(step, state)` just before the
      checkpoint of `step` is written, e.g. to save beside it what the checkpoint
      must cover (saved first, it may cover more than the last checkpoint that a
      killed run completed; `on_resume` drops the rest).
    record_extras: called as `record_extras(state)` for every metrics record, whose
      fields it adds (e.g. the pruning state's channel counts).
    mesh: train data-parallel on this mesh (`state` placed by `create_train_state` with
      it and `config.state_axis`); None: on the first local device.

  Returns:
    The final state (input `state` is donated) and the final test metrics
    {'test_loss', 'test_accuracy'}, plus {'train_loss', 'train_accuracy'} of the
    last epoch when it was trained by this call.

  Raises:
    TrainingDivergedError: the training loss or the state became non-finite.
  """
  placement = {} if mesh is None else {'mesh': mesh, 'state_axis': config.state_axis}
  if train_step_fn is None:
    train_step_fn = make_train_step(graphdefs.train, tx, **placement)
  eval_step_fn = make_eval_step(graphdefs.eval, mesh)
  if learning_rate_fn is not None:
    # Read for every record: one compiled call rather than a dozen operations run one by one
    # (each compiled on first use).
    learning_rate_fn = jax.jit(learning_rate_fn)

  def evaluate_fn(state: TrainState) -> dict[str, float]:
    with timing.TIMINGS.section(f'{phase}: evaluation'):
      test = evaluate(eval_step_fn, state.params, state.batch_stats,
                      eval_batches(config, mesh=mesh))
    return {'test_loss': test['loss'], 'test_accuracy': test['accuracy']}

  begin = time.perf_counter()
  before = dict(timing.TIMINGS.seconds)
  phase_dir = epath.Path(workdir) / phase
  checkpoint.save_arch(phase_dir, arch)
  manager = checkpoint.create_manager(phase_dir, max_to_keep=config.checkpoint_max_to_keep)
  try:
    with timing.TIMINGS.section(f'{phase}: checkpoints'):
      restored = checkpoint.restore_latest(manager, state)
    if restored is not None:
      state = restored
      logging.info('%s: resuming from step %d in %s', phase, int(state.step), phase_dir)
    start_step = int(state.step)
    time_offset = writer.resume(phase, start_step)
    if on_resume is not None:
      on_resume(start_step)
    final = {}
    if start_step < num_steps:
      state, final = _train_loop(
          phase,
          state,
          train_step_fn=train_step_fn,
          evaluate_fn=evaluate_fn,
          start_step=start_step,
          num_steps=num_steps,
          steps_per_epoch=steps_per_epoch,
          config=config,
          manager=manager,
          writer=writer,
          learning_rate_fn=learning_rate_fn,
          time_offset=time_offset,
          step_callback=step_callback,
          on_checkpoint=on_checkpoint,
          record_extras=record_extras,
          mesh=mesh,
      )
    if 'test_accuracy' not in final:
      final = evaluate_fn(state)
    with timing.TIMINGS.section(f'{phase}: checkpoints'):
      manager.wait_until_finished()
  finally:
    manager.close()
  # What the phase's other sections do not cover is its training steps.
  covered = sum(v - before.get(k, 0.0) for k, v in timing.TIMINGS.seconds.items())
  timing.TIMINGS.add(f'{phase}: steps', time.perf_counter() - begin - covered)
  return state, final


def _train_loop(
    phase: str,
    state: TrainState,
    *,
    train_step_fn: TrainStepFn,
    evaluate_fn: Callable[[TrainState], dict[str, float]],
    start_step: int,
    num_steps: int,
    steps_per_epoch: int,
    config: ml_collections.ConfigDict,
    manager: Any,
    writer: MetricsWriter,
    learning_rate_fn: optax.Schedule | None,
    time_offset: float,
    step_callback: Callable[[int, TrainState], None] | None,
    on_checkpoint: Callable[[int, TrainState], None] | None,
    record_extras: Callable[[TrainState], dict[str, Any]] | None,
    mesh: jax.sharding.Mesh | None,
) -> tuple[TrainState, dict[str, float]]:
  num_epochs = -(-num_steps // steps_per_epoch)
  last_checkpoint = start_step if start_step else None  # A restored run resumes from one.

  def stop(step: int, num_logged: int) -> NoReturn:
    if bar is not None:
      bar.close()
    raise TrainingDivergedError(
        _diverged_message(
            phase,
            manager.directory,
            step,
            (step - 1) // steps_per_epoch + 1,
            num_logged,
            last_checkpoint,
            learning_rate_fn,
        )
    )

  batches = train_batches(config, start_step, mesh=mesh)
  start_time = time.perf_counter() - time_offset
  log_metrics, epoch_metrics = [], []  # Per-step device metrics, fetched only when logged.
  final, bar = {}, None
  for step in range(start_step + 1, num_steps + 1):  # `step`: steps done after this one.
    epoch = (step - 1) // steps_per_epoch
    if bar is None:
      bar = tqdm.tqdm(
          total=min(steps_per_epoch, num_steps - epoch * steps_per_epoch),
          initial=(step - 1) % steps_per_epoch,
          desc=f'{phase} epoch {epoch + 1}/{num_epochs}',
          unit='step',
          disable=not config.progress_bar or jax.process_index() != 0,
          dynamic_ncols=True,
      )
    if step == start_step + 1:  # Compiles: charged to its own section.
      with timing.TIMINGS.section(f'{phase}: compile + first step'):
        state, metrics = jax.block_until_ready(train_step_fn(state, next(batches)))
    else:
      state, metrics = train_step_fn(state, next(batches))
    if step_callback is not None:
      step_callback(step, state)
    log_metrics.append(metrics)
    epoch_metrics.append(metrics)
    bar.update()

    end_of_epoch = step % steps_per_epoch == 0 or step == num_steps
    if step % config.log_every_steps == 0 and not end_of_epoch:
      record = _record(phase, step, steps_per_epoch, start_time, learning_rate_fn, log_metrics)
      if not math.isfinite(record['train_loss']):
        stop(step, len(log_metrics))
      if record_extras is not None:
        record.update(record_extras(state))
      log_metrics = []
      bar.set_postfix(loss=f'{record["train_loss"]:.4f}', acc=f'{record["train_accuracy"]:.4f}')
      writer.write(record, log_level=logging.DEBUG)  # The progress bar shows it.
    if not end_of_epoch:
      continue

    record = _record(phase, step, steps_per_epoch, start_time, learning_rate_fn, epoch_metrics)
    if not math.isfinite(record['train_loss']):
      stop(step, len(epoch_metrics))
    if record_extras is not None:
      record.update(record_extras(state))
    log_metrics, epoch_metrics = [], []
    final = {'train_loss': record['train_loss'], 'train_accuracy': record['train_accuracy']}
    postfix = {'loss': f'{record["train_loss"]:.4f}', 'acc': f'{record["train_accuracy"]:.4f}'}
    epochs_done = epoch + 1
    if epochs_done % config.eval_every_epochs == 0 or step == num_steps:
      final.update(evaluate_fn(state))
      postfix['test_acc'] = f'{final["test_accuracy"]:.4f}'
    bar.set_postfix(postfix)
    bar.close()
    bar = None
    record.update(
        {k: v for k, v in final.items() if k.startswith('test_')},
        time=time.perf_counter() - start_time,
    )
    # Written before the checkpoint: a run killed in between drops it on resume and writes it
    # again, rather than resuming after a step whose record is missing.
    writer.write(record)
    if epochs_done % config.checkpoint_every_epochs == 0 or step == num_steps:
      if not _all_finite((state.params, state.batch_stats)):
        stop(step, 0)
      with timing.TIMINGS.section(f'{phase}: checkpoints'):
        if on_checkpoint is not None:
          on_checkpoint(step, state)
        checkpoint.save(manager, step, state, force=True)
      last_checkpoint = step
  return state, final


def _all_finite(tree: PyTree) -> bool:
  """Whether every array of `tree` is finite: on the host where this process holds all of
  every array (nothing to compile; a checkpoint copies them there anyway), else on the
  devices."""
  leaves = jax.tree.leaves(tree)
  if all(getattr(x, 'is_fully_addressable', True) for x in leaves):
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in leaves)
  return bool(_all_finite_on_devices(tree))


@jax.jit
def _all_finite_on_devices(tree: PyTree) -> jax.Array:
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _diverged_message(
    phase: str,
    directory: epath.Path,
    step: int,
    epoch: int,
    num_logged: int,
    last_checkpoint: int | None,
    learning_rate_fn: optax.Schedule | None,
) -> str:
  """What became non-finite and where, what was kept, and what to try."""
  if num_logged:
    what = f'the mean training loss of steps {step - num_logged + 1}-{step} is not finite'
  else:
    what = f'the params or batch statistics are not finite after step {step}'
  if last_checkpoint is None:
    kept, again = 'No checkpoint of this phase was written yet', 'the phase starts over'
  else:
    kept = f'The last good checkpoint, step {last_checkpoint} in {directory}, is kept'
    again = 'with the same --workdir it continues from that checkpoint'
  lr = ''
  if learning_rate_fn is not None:
    lr = f' ({float(learning_rate_fn(step - 1)):.4g} at step {step})'
  return (
      f'Training diverged in phase {phase!r}, epoch {epoch}: {what}. Stopped without '
      f'checkpointing it. {kept}. Lower the learning rate of this phase{lr} and run again: '
      f'{again}.'
  )


def _record(
    phase: str,
    step: int,
    steps_per_epoch: int,
    start_time: float,
    learning_rate_fn: optax.Schedule | None,
    step_metrics: list[Metrics],
) -> dict[str, Any]:
  means = _mean_metrics(step_metrics)
  record = {
      'phase': phase,
      'step': step,
      'epoch': step / steps_per_epoch,
      'time': time.perf_counter() - start_time,
  }
  if learning_rate_fn is not None:
    record['lr'] = float(learning_rate_fn(step - 1))  # The rate used by the last step.
  record.update(train_loss=means['loss'], train_accuracy=means['accuracy'])
  return record
