"""The pruning phases of a run: prune-train, finalize, surgery, fine-tune, export, report.

Called by `train.train.train_and_evaluate` after the dense 'pretrain' phase when
`config.pruning.enabled`. Every training phase checkpoints into `workdir/<phase>`; finalize
and surgery are recomputed from the last prune checkpoint (they are deterministic and take
well under a second), so a killed run resumes where it stopped and ends with the same result.

On a mesh of several devices (or processes) the prune and fine-tune phases train
data-parallel; every pruning decision is made inside the jitted step on the global arrays,
so all agree. Finalize and surgery run on gathered copies (`parallel.to_local`), in every
process alike; only process 0 writes the trajectories, the report and the exported model's
StableHLO.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

import dpm_jax
from dpm_jax import channels
from dpm_jax import checkpoint
from dpm_jax import latency
from dpm_jax import pruning
from dpm_jax import recipes
from dpm_jax import report
from train import loop
from train import parallel
from train import timing

TRAJECTORIES = "trajectories.npz"
# Fields of `config.pruning` in epochs, and the recipe options they become (in steps).
_EPOCH_FIELDS = {"start_epoch": "start_step", "end_epoch": "end_step",
                 "interval_epochs": "interval", "tick_epochs": "tick_steps",
                 "tock_epochs": "tock_steps", "release_epochs": "release_steps"}
# What `config.pruning.target_flops` may be a fraction of (`config.pruning.cost`).
COSTS = ("flops", "latency")
# Fields that are not options of a recipe's parts.
_RUN_FIELDS = {"enabled", "method", "criterion", "allocation", "removal", "target_flops",
               "cost", "latency_step", "latency_batch",
               "epochs", "learning_rate", "lr_schedule", "record_every_steps",
               "finetune_epochs", "finetune_learning_rate", "finetune_lr_schedule"}


def recipe_from_config(pc: ml_collections.ConfigDict, steps_per_epoch: int) -> recipes.Recipe:
  """The `Recipe` of `config.pruning`: its preset (`method`) with the parts it names, and
  those of its option fields that the chosen parts take, unless None (epochs converted to
  optimizer steps; an event at the end of the phase is taken at its last step)."""
  if pc.method not in recipes.PRESETS:
    raise ValueError(f"Unknown config.pruning.method {pc.method!r}; valid choices: "
                     f"{', '.join(sorted(recipes.PRESETS))}.")
  names = {"removal": pc.removal, "criterion": pc.get("criterion") or None,
           "allocation": pc.get("allocation") or None}
  names = {k: v for k, v in names.items() if v}
  prune_steps = round(pc.epochs * steps_per_epoch)
  values = {}
  for field, value in pc.items():
    if value is None:  # the method's default
      continue
    if field in _EPOCH_FIELDS:
      values[_EPOCH_FIELDS[field]] = min(round(value * steps_per_epoch), max(prune_steps - 1, 0))
    elif field not in _RUN_FIELDS:
      values[field] = value
  takes = recipes.option_names(pc.method, **names)
  options = {k: v for k, v in values.items() if k in takes}
  return recipes.PRESETS[pc.method](target_flops=pc.target_flops, **names, **options)


def _validate_cost(pc: ml_collections.ConfigDict) -> None:
  cost = pc.get("cost", "flops")
  if cost not in COSTS:
    raise loop.ConfigError(f"config.pruning.cost={cost!r}; choose one of {', '.join(COSTS)}.")
  if cost != "latency":
    return
  step = pc.get("latency_step")
  if isinstance(step, bool) or not isinstance(step, int) or step < 1:
    raise loop.ConfigError(f"config.pruning.latency_step={step!r} must be an int >= 1.")
  batch = pc.get("latency_batch")
  if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
    raise loop.ConfigError(f"config.pruning.latency_batch={batch!r} must be None or an "
                           "int >= 1.")
  if jax.process_count() > 1:
    raise loop.ConfigError(
        "config.pruning.cost='latency' in a run of several processes: each would measure "
        "its own latency table, and their selections could differ. Measure the table in "
        "a run of one process (it is cached), or use --config.pruning.cost=flops.")
  multiples = pc.round_to if isinstance(pc.round_to, (tuple, list)) else (pc.round_to,)
  if any(m % step for m in multiples):
    raise loop.ConfigError(
        f"config.pruning.round_to={pc.round_to!r} with cost='latency': the latency table "
        f"times widths in multiples of latency_step={step} only (others are not measured, "
        f"and often run slower). Set round_to to a multiple of {step}, e.g. "
        f"--config.pruning.round_to={step}.")


def latency_cost(pc: ml_collections.ConfigDict, spec: dpm_jax.GroupSpec,
                 batch_size: int) -> latency.LatencyTable:
  """The latency table of `spec` on this device, at `config.pruning.latency_batch` (or
  `batch_size`): measured once, then read from `latency.DEFAULT_CACHE_DIR`."""
  batch = pc.get("latency_batch") or batch_size
  return latency.measure_latency(spec, step=pc.latency_step, batch=batch,
                                 cache_dir=latency.DEFAULT_CACHE_DIR)


def validate_pruning_config(config: ml_collections.ConfigDict, steps_per_epoch: int) -> None:
  """Raises `loop.ConfigError` for a pruning config that cannot work, before any training."""
  pc = config.pruning
  try:
    recipe = recipe_from_config(pc, steps_per_epoch)  # validates every recipe field
  except (TypeError, ValueError) as e:
    raise loop.ConfigError(
        f"config.pruning: {e} Change the field in the config file or with "
        "--config.pruning.<field>=...") from e
  _validate_cost(pc)
  prune_steps = round(pc.epochs * steps_per_epoch)
  if recipe.last_step >= prune_steps:
    raise loop.ConfigError(
        f"config.pruning.epochs={pc.epochs} ({prune_steps} steps) is too short: the last "
        f"pruning event is at step {recipe.schedule.last_event} and its channels need "
        f"{recipe.removal.settle_steps} more steps to reach zero. "
        "Lengthen the phase, move end_epoch earlier or shorten decay_steps.")


def phase_config(config: ml_collections.ConfigDict, *, learning_rate: float, epochs: float,
                 lr_schedule: str) -> ml_collections.ConfigDict:
  """`config` with the optimisation settings of one phase."""
  c = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
  c.learning_rate, c.num_epochs, c.lr_schedule = learning_rate, epochs, lr_schedule
  c.warmup_epochs = 0.0
  return c


class TrajectoryRecorder:
  """Records every channel's norm and status every `every` steps of the prune phase.

  Called after every step (`train_phase`'s `step_callback`); `checkpoint` saves what was
  recorded just before each checkpoint is written, and `resume` keeps what the restored
  checkpoint covers, so a resumed run ends with the trajectories of an uninterrupted one.
  """

  def __init__(self, index: channels.ChannelIndex, every: int, path: epath.Path):
    self.every, self.path = every, path
    # Fresh arrays (a copy of the status, not the state's buffer, which the next step
    # donates), left on the device: they are fetched in one block when saved, so recording
    # does not wait for every step to finish.
    self._record = jax.jit(lambda params, ps: (
        jnp.sqrt(channels.sq_norms(index, params)),
        jnp.array(pruning.channel_status(ps), copy=True)))
    self.steps, self.norms, self.status = [], [], []

  def resume(self, step: int) -> None:
    """Keeps what an interrupted run saved up to `step`, the step it resumes from."""
    self.steps, self.norms, self.status = [], [], []
    if self.path.exists():
      old = report.Trajectories.load(self.path)
      keep = old.steps <= step
      self.steps = list(old.steps[keep])
      self.norms = list(old.norms[keep])
      self.status = list(old.status[keep])

  def __call__(self, step: int, state: loop.TrainState) -> None:
    if step % self.every:
      return
    norms, status = self._record(state.params, dpm_jax.prune_state(state.opt_state))
    self.steps.append(step)
    self.norms.append(norms)
    self.status.append(status)

  def checkpoint(self, step: int, state: loop.TrainState) -> None:
    """Saves what was recorded up to `step`, before the checkpoint of `step` is written."""
    del step  # Everything recorded so far is at or before it.
    self.save(dpm_jax.prune_state(state.opt_state))

  def trajectories(self, ps) -> report.Trajectories:
    released, released_at = pruning.given_back(ps._replace(removal=parallel.to_host(ps.removal)))
    self.norms, self.status = parallel.to_host((self.norms, self.status))  # one transfer
    return report.Trajectories(np.asarray(self.steps), np.asarray(self.norms),
                               np.asarray(self.status), released, released_at)

  def save(self, ps) -> report.Trajectories:
    """The trajectories so far, written (by process 0) to `path`."""
    traj = self.trajectories(ps)
    if jax.process_index() == 0:
      traj.save(self.path)
    return traj


class PruneMetrics:
  """What the prune phase adds to its metrics records: the FLOPs left by the current
  selection, and how many channels are decaying, pruned and were given back (released or
  restored); `event` writes them as a record of their own after each pruning event.
  """

  def __init__(self, spec: dpm_jax.GroupSpec, schedule: Any, steps_per_epoch: int,
               writer: loop.MetricsWriter):
    self.spec, self.writer, self.steps_per_epoch = spec, writer, steps_per_epoch
    self.dense_macs = dpm_jax.spec_cost(spec).macs
    # Steps after which an event has happened (the event at count s is taken by step s + 1).
    self.after_events = {s + 1 for s in getattr(schedule, "event_steps", ())}

    def counts(ps):
      status = pruning.channel_status(ps)
      released = getattr(ps.removal, "released", jnp.zeros_like(status, jnp.int32))
      return (status == pruning.ACTIVE, jnp.sum(status == pruning.DECAYING),
              jnp.sum(status == pruning.PRUNED), jnp.sum(released > 0))

    self._counts = jax.jit(counts)

  def __call__(self, state: loop.TrainState) -> dict[str, Any]:
    ps = dpm_jax.prune_state(state.opt_state)
    keep, decaying, pruned, released = parallel.to_host(self._counts(ps))
    splits = np.cumsum([s.shape[0] for s in ps.status])[:-1]
    macs = dpm_jax.spec_cost(self.spec, np.split(keep, splits)).macs
    return {"flops_ratio": macs / self.dense_macs, "decaying_channels": int(decaying),
            "pruned_channels": int(pruned), "released_channels": int(released)}

  def event(self, step: int, state: loop.TrainState) -> None:
    """After a step that took a pruning event: a record of what it selected."""
    if step in self.after_events:
      values = self(state)
      values["event_flops_ratio"] = values.pop("flops_ratio")
      self.writer.write({"phase": "prune", "step": step, "epoch": step / self.steps_per_epoch,
                         **values})


class FinetunePlanner:
  """Compiles the fine-tune step in the background once the prune phase has settled.

  Called after every prune step (with the recorder). At the step after `recipe.last_step`
  every selected channel is removed (unless self-rectifying or protection changes the
  selection later), so the pruned model's shapes are known: they are taken from a surgery
  of that step's params, and the fine-tune step starts compiling while the prune phase
  trains on. `step_for` hands it out only if the final model has the same graph.
  """

  def __init__(self, config: ml_collections.ConfigDict, spec: dpm_jax.GroupSpec,
               graphdefs: loop.GraphDefs, at_step: int, steps_per_epoch: int,
               mesh: jax.sharding.Mesh | None = None):
    self.config, self.spec, self.graphdefs = config, spec, graphdefs
    self.at_step, self.steps_per_epoch, self.mesh = at_step, steps_per_epoch, mesh
    self.planned: tuple[loop.GraphDefs, Any, loop.TrainStepFn] | None = None

  def __call__(self, step: int, state: loop.TrainState) -> None:
    if step != self.at_step:
      return
    status = parallel.to_host(dpm_jax.prune_state(state.opt_state).status)
    keep = [s == pruning.ACTIVE for s in status]
    params, stats = parallel.to_local((state.params, state.batch_stats))
    model = _model(self.graphdefs.eval, params, stats)
    small_defs, params, stats = loop.split_model(dpm_jax.remove_channels(model, self.spec, keep))
    tx = loop.create_optimizer(finetune_config(self.config), self.steps_per_epoch)
    step_fn = loop.compile_step_ahead(
        small_defs.train, tx, params, stats,
        next(loop.train_batches(self.config, mesh=self.mesh)),
        **_placement(self.config, self.mesh)).start()
    self.planned = (small_defs, tx, step_fn)

  def step_for(self, graphdefs: loop.GraphDefs) -> tuple[Any, loop.TrainStepFn] | None:
    """The fine-tune optimizer and step planned for `graphdefs`, or None."""
    if self.planned is None or self.planned[0] != graphdefs:
      return None
    return self.planned[1], self.planned[2]


def finetune_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  pc = config.pruning
  return phase_config(config, learning_rate=pc.finetune_learning_rate,
                      epochs=pc.finetune_epochs, lr_schedule=pc.finetune_lr_schedule)


def _forward(model: nnx.Module, x: jax.Array) -> jax.Array:
  """`model(x)`, jitted (one compile, rather than one per operation)."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)


def _model(graphdef, params, batch_stats) -> nnx.Module:
  return nnx.merge(graphdef, params, batch_stats, copy=True)


def _sample_batch(config) -> dict[str, Any]:
  return next(iter(loop.eval_batches(config)))


def _placement(config: ml_collections.ConfigDict,
               mesh: jax.sharding.Mesh | None) -> dict[str, Any]:
  """The keyword arguments that place a train state and its step on `mesh` (none without)."""
  return {} if mesh is None else {"mesh": mesh, "state_axis": config.state_axis}


class Plan(NamedTuple):
  """The prune phase, built before it runs: its channel groups, recipe, optimizer (the
  recipe inside the phase's optimizer) and jitted train step."""

  spec: dpm_jax.GroupSpec
  recipe: recipes.Recipe
  config: ml_collections.ConfigDict  # the run's config with the phase's optimisation
  tx: Any
  train_step: loop.TrainStepFn


def plan(config: ml_collections.ConfigDict, graphdefs: loop.GraphDefs, params: Any,
         batch_stats: Any, steps_per_epoch: int, *, background: bool = False,
         mesh: jax.sharding.Mesh | None = None) -> Plan:
  """The prune phase of `config` for the model `graphdefs` with arrays like `params` and
  `batch_stats` (only their shapes matter: the groups come from the trace).

  With `background`, its train step is a `loop.BackgroundCompiledStep`: `start` it to
  compile in a background thread while the dense phase trains. With `mesh`, the step trains
  data-parallel on it.
  """
  pc = config.pruning
  recipe = recipe_from_config(pc, steps_per_epoch)
  image = jnp.asarray(_sample_batch(config)["image"][:1])
  spec = dpm_jax.trace_groups(_model(graphdefs.eval, params, batch_stats), image)
  if pc.get("cost", "flops") == "latency":
    with timing.TIMINGS.section("latency table"):
      recipe = recipe.replace(cost=latency_cost(pc, spec, config.batch_size))
    logging.info("Latency target: %s of the dense network's predicted %.2f ms (%s)",
                 pc.target_flops, 1e3 * recipe.cost(spec).dense_cost, recipe.cost)
  prune_cfg = phase_config(config, learning_rate=pc.learning_rate, epochs=pc.epochs,
                           lr_schedule=pc.lr_schedule)
  tx = dpm_jax.prune(loop.create_optimizer(prune_cfg, steps_per_epoch), spec, recipe)
  placement = _placement(config, mesh)
  if background:
    step = loop.compile_step_ahead(graphdefs.train, tx, params, batch_stats,
                                   next(loop.train_batches(config, mesh=mesh)), **placement)
  else:
    step = loop.make_train_step(graphdefs.train, tx, **placement)
  return Plan(spec, recipe, prune_cfg, tx, step)


def run(config: ml_collections.ConfigDict, workdir: epath.Path, state: loop.TrainState,
        *, graphdefs: loop.GraphDefs, steps_per_epoch: int,
        writer: loop.MetricsWriter, dense_metrics: Mapping[str, float],
        prune_plan: Plan | None = None,
        mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Prune-train, finalize, surgery, fine-tune, evaluate, export and report.

  Args:
    config: the run's config (`config.pruning` holds the pruning settings).
    workdir: the run directory.
    state: the pretrained dense state (its params and batch statistics are used).
    graphdefs: the dense model's graph definitions.
    steps_per_epoch: optimizer steps per epoch.
    writer: the metrics writer.
    dense_metrics: the dense model's test metrics.
    prune_plan: the prune phase as `plan` built it before pretraining (its step compiled
      meanwhile); None builds it now. It is used only if its groups are those of `state`.
    mesh: train data-parallel on this mesh (`state` placed on it); None: on the first
      local device.

  Returns:
    The final metrics, with the pruned network's FLOPs and params ratios.
  """
  pc = config.pruning
  with timing.TIMINGS.section("trace groups"):
    sample = _sample_batch(config)
    dense_params, dense_stats = parallel.to_local((state.params, state.batch_stats))
    dense_model = _model(graphdefs.eval, dense_params, dense_stats)
    spec = dpm_jax.trace_groups(dense_model, jnp.asarray(sample["image"][:1]))
    logging.info("Channel groups:\n%s", spec)
    dense_arch = dense_model.arch()
    if prune_plan is None or prune_plan.spec != spec:
      prune_plan = plan(config, graphdefs, dense_params, dense_stats, steps_per_epoch,
                        mesh=mesh)
  recipe, prune_cfg, tx = prune_plan.recipe, prune_plan.config, prune_plan.tx
  placement = _placement(config, mesh)

  # Prune-train: the recipe runs inside the optimizer.
  prune_state0 = loop.create_train_state(state.params, state.batch_stats, tx, **placement)
  recorder = TrajectoryRecorder(channels.ChannelIndex.build(spec), pc.record_every_steps,
                                workdir / "prune" / TRAJECTORIES)
  prune_steps = round(pc.epochs * steps_per_epoch)
  planner = FinetunePlanner(config, spec, graphdefs, recipe.last_step + 1, steps_per_epoch,
                            mesh=mesh)
  prune_metrics_fn = PruneMetrics(spec, recipe.schedule, steps_per_epoch, writer)

  def after_step(step: int, state: loop.TrainState) -> None:
    recorder(step, state)
    prune_metrics_fn.event(step, state)
    if pc.finetune_epochs > 0 and step < prune_steps:
      planner(step, state)

  start = time.perf_counter()
  pruned, prune_metrics = loop.train_phase(
      "prune", prune_state0, graphdefs=graphdefs, tx=tx,
      num_steps=prune_steps, steps_per_epoch=steps_per_epoch,
      config=config, workdir=workdir, arch=dense_arch, writer=writer,
      learning_rate_fn=loop.create_learning_rate_schedule(prune_cfg, steps_per_epoch),
      train_step_fn=prune_plan.train_step, step_callback=after_step,
      on_resume=recorder.resume, on_checkpoint=recorder.checkpoint,
      record_extras=prune_metrics_fn, mesh=mesh)
  ps = dpm_jax.prune_state(pruned.opt_state)
  traj = recorder.save(ps)

  # Finalize (every selected channel exactly zero), then surgery: on this process's copy of
  # the global arrays, the same in every process.
  with timing.TIMINGS.section("finalize + surgery"):
    pruned = parallel.to_local(pruned)
    params, keep = dpm_jax.finalize(pruned.params, pruned.opt_state, spec)
    full = _model(graphdefs.eval, params, pruned.batch_stats)
    x = jnp.asarray(sample["image"])
    small = dpm_jax.remove_channels(full, spec, keep, sample=x)  # raises unless exact
    small.eval()
    surgery_diff = float(jnp.max(jnp.abs(_forward(full, x) - _forward(small, x))))
  logging.info("Surgery: max |masked - pruned| output difference on a test batch: %.3g",
               surgery_diff)
  primary = jax.process_index() == 0
  if primary:  # The plots do not depend on fine-tuning: drawn in a thread while it runs.
    plotting = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="report")
    plots = plotting.submit(report.write_plots, os.fspath(workdir), spec, keep, traj)
    plotting.shutdown(wait=False)
  small_graphdefs, small_params, small_stats = loop.split_model(small)
  if mesh is not None:
    small_params, small_stats = parallel.put((small_params, small_stats),
                                             parallel.replicated(mesh))
  eval_fn = loop.make_eval_step(small_graphdefs.eval, mesh)
  with timing.TIMINGS.section("surgery: evaluation"):
    after_surgery = loop.evaluate(eval_fn, small_params, small_stats,
                                  loop.eval_batches(config, mesh=mesh))

  # Fine-tune the smaller network.
  finetune_metrics = {"test_accuracy": after_surgery["accuracy"],
                      "test_loss": after_surgery["loss"]}
  final_params, final_stats = small_params, small_stats
  if pc.finetune_epochs > 0:
    ft_cfg = finetune_config(config)
    ft_tx, ft_step = planner.step_for(small_graphdefs) or (
        loop.create_optimizer(ft_cfg, steps_per_epoch), None)
    ft_state = loop.create_train_state(small_params, small_stats, ft_tx, **placement)
    ft_state, finetune_metrics = loop.train_phase(
        "finetune", ft_state, graphdefs=small_graphdefs, tx=ft_tx, train_step_fn=ft_step,
        num_steps=round(pc.finetune_epochs * steps_per_epoch), steps_per_epoch=steps_per_epoch,
        config=config, workdir=workdir, arch=small.arch(), writer=writer,
        learning_rate_fn=loop.create_learning_rate_schedule(ft_cfg, steps_per_epoch),
        mesh=mesh)
    final_params, final_stats = ft_state.params, ft_state.batch_stats
  elapsed = time.perf_counter() - start

  # Export: the pruned model's weights and architecture, loadable without the pruning code,
  # and its inference function (StableHLO), which runs with jax alone.
  export_dir = workdir / "export"
  with timing.TIMINGS.section("export"):
    checkpoint.export_model(export_dir, small.arch(), final_params, final_stats)
    final_local = parallel.to_local((final_params, final_stats))
    if primary:
      checkpoint.export_inference(export_dir, small.arch(), *final_local, sample["image"])

  dense_cost, pruned_cost = dpm_jax.spec_cost(spec), dpm_jax.spec_cost(spec, keep)
  result = {
      "test_accuracy": finetune_metrics["test_accuracy"],
      "test_loss": finetune_metrics["test_loss"],
      "dense_test_accuracy": dense_metrics["test_accuracy"],
      "prune_test_accuracy": prune_metrics["test_accuracy"],
      "surgery_test_accuracy": after_surgery["accuracy"],
      "flops_ratio": pruned_cost.macs / dense_cost.macs,
      "params_ratio": pruned_cost.params / dense_cost.params,
      "surgery_max_abs_diff": surgery_diff,
      "released_channels": int((traj.released > 0).sum()),
      "releases": int(traj.released.sum()),
      "widths": [int(k.sum()) for k in keep],  # Per group, in the spec's order.
  }
  if pc.get("cost", "flops") == "latency":
    cost = recipe.cost(spec)
    kept = jnp.asarray(np.concatenate(keep)) if keep else jnp.zeros(0, bool)
    result["predicted_latency_ratio"] = float(cost.cost(kept)) / cost.dense_cost
  writer.replace({"phase": "result", **result})  # once, also when a finished run is run again
  if not primary:
    return result
  (workdir / "result.json").write_text(json.dumps(result, indent=2))
  summary = {
      "model": f"{config.model} on {config.dataset}",
      "recipe": f"{pc.method} (removal={pc.removal}): {recipe}",
      "test accuracy": f"dense {result['dense_test_accuracy']:.4f} -> after pruning "
                       f"{result['prune_test_accuracy']:.4f} -> after surgery "
                       f"{result['surgery_test_accuracy']:.4f} -> fine-tuned "
                       f"{result['test_accuracy']:.4f}",
      "surgery": f"exact to {surgery_diff:.2e} (max abs output difference, test batch)",
      "given back": f"{result['released_channels']} channels released by self-rectifying "
                    f"or restored by protection ({result['releases']} times)",
      "pruning + fine-tuning wall time": f"{elapsed:.1f} s",
      "exported to": f"{export_dir}",
  }
  with timing.TIMINGS.section("report"):
    path = report.write_report(os.fspath(workdir), spec, keep,
                               title=f"Pruning report: {config.model} on {config.dataset}",
                               summary=summary, trajectories=traj, plots=plots.result())
  logging.info("Report: %s", path)
  return result
