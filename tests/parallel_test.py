"""Data-parallel and multi-process training: the same decisions on 1, 8 and 2 x 4 devices.

The runs are whole `train.main` command lines in subprocesses, each with its own number of
fake CPU devices (`--xla_force_host_platform_device_count`), on the real digits data
(prepared once for the module); the two-process run talks through JAX's CPU collectives on
localhost.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import textwrap

import grain
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from dpm_jax import checkpoint
from dpm_jax import data
from dpm_jax.pruning import base
from train import loop
from train import parallel
from train import tensorboard
from train import train
from configs import test_dpm

ROOT = pathlib.Path(__file__).parent.parent
TIMEOUT = 900


def _env(devices: int, cache: pathlib.Path) -> dict[str, str]:
  env = dict(os.environ)
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu',
             PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(cache))
  return env


def _start(workdir: pathlib.Path, data_dir: str, devices: int, cache: pathlib.Path,
           log: pathlib.Path, *flags: str) -> subprocess.Popen:
  argv = [sys.executable, '-m', 'train.main', '--config=configs/test_dpm.py',
          f'--workdir={workdir}', f'--config.data_dir={data_dir}', *flags]
  with log.open('w') as f:
    return subprocess.Popen(argv, cwd=ROOT, env=_env(devices, cache), stdout=f,
                            stderr=subprocess.STDOUT)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> str:
  directory = str(tmp_path_factory.mktemp('tfds'))
  data.dataset_info('digits', data_dir=directory)  # Prepared once, before the runs read it.
  return directory


@pytest.fixture(scope='module')
def runs(tmp_path_factory, data_dir) -> dict[str, pathlib.Path]:
  """configs/test_dpm.py on 1 device, on 8 (the state replicated, and split along the data
  axis), and on two processes of 4 each, all at once."""
  root = tmp_path_factory.mktemp('runs')
  cache = root / 'jax_cache'
  workdirs = {name: root / name for name in ('one', 'eight', 'eight_split', 'two_by_four')}
  port = _free_port()
  logs = [root / f'{name}.log'
          for name in ('one', 'eight', 'eight_split', 'process0', 'process1')]
  procs = [
      _start(workdirs['one'], data_dir, 1, cache, logs[0]),
      _start(workdirs['eight'], data_dir, 8, cache, logs[1]),
      _start(workdirs['eight_split'], data_dir, 8, cache, logs[2], '--config.state_axis=data'),
      *(_start(workdirs['two_by_four'], data_dir, 4, cache, logs[3 + i],
               f'--coordinator_address=localhost:{port}', '--num_processes=2',
               f'--process_id={i}') for i in range(2)),
  ]
  for proc in procs:
    proc.wait(timeout=TIMEOUT)
  for proc, log in zip(procs, logs):
    assert proc.returncode == 0, log.read_text()[-3000:]
  return workdirs


def _final_params(workdir: pathlib.Path) -> dict[str, np.ndarray]:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  model = checkpoint.load_model(workdir / 'export')
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
          jax.tree.leaves_with_path(nnx.to_pure_dict(nnx.state(model)))}


def _assert_same_decisions(actual: pathlib.Path, expected: pathlib.Path, *, rtol: float) -> None:
  got = np.load(actual / 'prune' / 'trajectories.npz')
  want = np.load(expected / 'prune' / 'trajectories.npz')
  np.testing.assert_array_equal(got['steps'], want['steps'])
  # Every channel's status (active, decaying, pruned) at every recorded step: the same
  # selections, decays, releases and final keep masks.
  np.testing.assert_array_equal(got['status'], want['status'])
  np.testing.assert_array_equal(got['released'], want['released'])
  assert (got['status'][-1] == base.PRUNED).any() and (got['status'][-1] == base.ACTIVE).any()
  np.testing.assert_allclose(got['norms'], want['norms'], rtol=rtol, atol=rtol)
  assert checkpoint.load_arch(actual / 'export') == checkpoint.load_arch(expected / 'export')
  got_params, want_params = _final_params(actual), _final_params(expected)
  assert got_params.keys() == want_params.keys()
  for key in want_params:
    np.testing.assert_allclose(got_params[key], want_params[key], rtol=rtol, atol=rtol,
                               err_msg=key)
  got_result = json.loads((actual / 'result.json').read_text())
  want_result = json.loads((expected / 'result.json').read_text())
  assert got_result['flops_ratio'] == want_result['flops_ratio']


def test_eight_devices_take_the_decisions_of_one(runs):
  _assert_same_decisions(runs['eight'], runs['one'], rtol=1e-4)


def test_a_state_split_over_eight_devices_takes_the_decisions_of_a_replicated_one(runs):
  _assert_same_decisions(runs['eight_split'], runs['eight'], rtol=1e-4)


def test_a_finished_eight_device_run_started_again_restores_its_result(runs, data_dir,
                                                                        tmp_path):
  workdir = tmp_path / 'again'
  shutil.copytree(runs['eight'], workdir)
  log = tmp_path / 'again.log'
  proc = _start(workdir, data_dir, 8, tmp_path / 'cache', log)
  assert proc.wait(timeout=TIMEOUT) == 0, log.read_text()[-3000:]
  text = log.read_text()
  for phase, step in (('pretrain', 44), ('prune', 44), ('finetune', 11)):
    assert f'{phase}: resuming from step {step}' in text
  again = json.loads((workdir / 'result.json').read_text())
  assert again == json.loads((runs['eight'] / 'result.json').read_text())


def test_two_processes_of_four_devices_take_the_decisions_of_one_of_eight(runs):
  _assert_same_decisions(runs['two_by_four'], runs['eight'], rtol=1e-4)
  # Process 0 wrote the run's files, once: the records of the one-process run.
  records = {name: [json.loads(line) for line in
                    (runs[name] / loop.METRICS_FILENAME).read_text().splitlines()]
             for name in ('two_by_four', 'eight')}
  keys = {name: [(r['phase'], r.get('step'), sorted(r)) for r in rs]
          for name, rs in records.items()}
  assert keys['two_by_four'] == keys['eight']
  assert len(list(runs['two_by_four'].glob('events.out.tfevents.*'))) == 1


_SHARDING_CHECK = textwrap.dedent('''
    import json, sys
    import jax, numpy as np, optax
    from flax import nnx
    from configs import test_dpm
    from dpm_jax import models
    from train import loop, parallel, train

    config = test_dpm.get_config()
    config.data_dir = sys.argv[1]
    mesh = train.create_mesh(config)
    batch = next(loop.train_batches(config, mesh=mesh))
    model = models.create_model(config.model, num_classes=10, rngs=nnx.Rngs(0),
                                **config.model_kwargs.to_dict())
    graphdefs, params, stats = loop.split_model(model)
    tx = optax.sgd(0.1, momentum=0.9)
    out = {'devices': jax.device_count(), 'mesh': dict(mesh.shape),
           'batch_spec': str(batch['image'].sharding.spec),
           'batch_shards': sorted({s.data.shape for s in batch['image'].addressable_shards}),
           'batch_devices': len(batch['image'].sharding.device_set)}
    for axis in ('', 'data'):
      state = loop.create_train_state(params, stats, tx, mesh=mesh, state_axis=axis)
      state, _ = loop.make_train_step(graphdefs.train, tx, mesh=mesh, state_axis=axis)(
          state, batch)
      kernel = state.params['head']['kernel']
      momentum = state.opt_state[0].trace['head']['kernel']
      out[f'state_{axis or "replicated"}'] = {
          'kernel_replicated': kernel.sharding.is_fully_replicated,
          'kernel_shards': sorted({s.data.shape for s in kernel.addressable_shards}),
          'momentum_like_kernel': momentum.sharding == kernel.sharding}
    config.batch_size = 36
    try:
      train.create_mesh(config)
    except loop.ConfigError as e:
      out['error'] = str(e)
    print('RESULT', json.dumps(out))
''')


def test_batches_are_split_over_the_devices_and_the_state_replicated_or_split(
    data_dir, tmp_path):
  proc = subprocess.run([sys.executable, '-c', _SHARDING_CHECK, data_dir], cwd=ROOT,
                        env=_env(8, tmp_path / 'cache'), capture_output=True, text=True,
                        timeout=TIMEOUT, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split('RESULT ', 1)[1])
  assert out['devices'] == 8 and out['mesh'] == {'data': 8}
  # 32 rows: 4 on each of the 8 devices.
  assert out['batch_spec'] == "P('data',)" and out['batch_devices'] == 8
  assert out['batch_shards'] == [[4, 8, 8, 1]]
  # After a step, the params and the optimizer state are still where they were put.
  replicated = out['state_replicated']
  assert replicated['kernel_replicated'] and replicated['kernel_shards'] == [[32, 10]]
  split = out['state_data']  # The head's kernel [32, 10] split along its 32 inputs.
  assert not split['kernel_replicated'] and split['kernel_shards'] == [[4, 10]]
  assert replicated['momentum_like_kernel'] and split['momentum_like_kernel']
  assert out['error'] == (
      'config.batch_size=36 is not a multiple of the 8 devices the batch is split over (the '
      "mesh {'data': 8}); use a multiple, e.g. 32 or 40. Change it in the config file or "
      'with --config.batch_size=...')


def test_a_mesh_that_does_not_fit_the_devices_is_a_config_error():
  config = test_dpm.get_config()
  n = jax.device_count()
  config.mesh = (('data', n + 1),)
  with pytest.raises(loop.ConfigError, match=f'config.mesh=.*do not fit the {n} devices'):
    train.create_mesh(config)
  config.mesh = (('data', -1), ('model', -1))
  with pytest.raises(loop.ConfigError, match='at most one -1'):
    train.create_mesh(config)
  config.mesh = (('data', -1),)
  config.state_axis = 'model'
  with pytest.raises(loop.ConfigError, match="config.state_axis='model' is not an axis"):
    train.create_mesh(config)


@pytest.mark.parametrize('shards', [2, 4])
def test_the_shards_of_every_batch_make_the_batch(shards):
  kwargs = dict(batch_size=8, seed=3, num_epochs=2)
  with tfds.testing.mock_data(num_examples=20):
    whole = list(data.train_iterator('digits', **kwargs))
    parts = [list(data.train_iterator('digits', **kwargs,
                                      shard=grain.sharding.ShardOptions(i, shards)))
             for i in range(shards)]
    test = list(data.eval_iterator('digits', batch_size=8))
    test_parts = [list(data.eval_iterator('digits', batch_size=8,
                                          shard=grain.sharding.ShardOptions(i, shards)))
                  for i in range(shards)]
  assert len(whole) == 5 and [len(p) for p in parts] == [5] * shards
  # 20 test rows in batches of 8: the last has 4 real rows; with 4 shards, shards 2 and 3
  # hold only padding (mask 0) of it.
  assert len(test) == 3 and [len(p) for p in test_parts] == [3] * shards
  for batches, split in ((whole, parts), (test, test_parts)):
    for i, batch in enumerate(batches):
      for key in batch:
        np.testing.assert_array_equal(np.concatenate([p[i][key] for p in split]), batch[key])
  with pytest.raises(ValueError, match='cannot be split evenly into 3 shards'):
    data.train_iterator('digits', batch_size=8, seed=0,
                        shard=grain.sharding.ShardOptions(0, 3))


def _read_events(path: pathlib.Path) -> list[dict]:
  """The events of a file, decoded from the record framing and protobuf wire format by hand
  (no TensorFlow, no tensorboard): [{'step', 'wall_time', 'file_version' | 'values'}]."""

  def crc32c(data: bytes) -> int:  # Bit by bit, unlike the writer's table.
    crc = 0xFFFFFFFF
    for byte in data:
      crc ^= byte
      for _ in range(8):
        crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF

  def masked(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

  def fields(buf: bytes):
    i = 0
    while i < len(buf):
      key, i = varint(buf, i)
      number, wire = key >> 3, key & 7
      if wire == 0:
        value, i = varint(buf, i)
      elif wire == 1:
        value, i = buf[i:i + 8], i + 8
      elif wire == 5:
        value, i = buf[i:i + 4], i + 4
      else:
        assert wire == 2, wire
        size, i = varint(buf, i)
        value, i = buf[i:i + size], i + size
      yield number, value

  def varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
      byte = buf[i]
      i += 1
      value |= (byte & 0x7F) << shift
      shift += 7
      if not byte & 0x80:
        return value, i

  blob, events, i = path.read_bytes(), [], 0
  while i < len(blob):
    header = blob[i:i + 8]
    assert int.from_bytes(blob[i + 8:i + 12], 'little') == masked(header)
    size = int.from_bytes(header, 'little')
    payload = blob[i + 12:i + 12 + size]
    assert int.from_bytes(blob[i + 12 + size:i + 16 + size], 'little') == masked(payload)
    i += 16 + size
    event = {'step': 0}
    for number, value in fields(payload):
      if number == 1:
        event['wall_time'] = np.frombuffer(value, '<f8')[0]
      elif number == 2:
        event['step'] = value
      elif number == 3:
        event['file_version'] = value.decode()
      elif number == 5:
        event['values'] = {}
        for _, summary_value in fields(value):
          parts = dict(fields(summary_value))
          event['values'][parts[1].decode()] = float(np.frombuffer(parts[2], '<f4')[0])
    events.append(event)
  return events


def test_tensorboard_events_hold_the_numbers_of_metrics_jsonl(runs):
  workdir = runs['one']
  (path,) = workdir.glob('events.out.tfevents.*')
  events = _read_events(path)
  assert events[0]['file_version'] == 'brain.Event:2'
  scalars = {(tag, e['step']): v for e in events[1:] for tag, v in e['values'].items()}
  records = [json.loads(line) for line in (workdir / loop.METRICS_FILENAME).read_text()
             .splitlines()]
  expected = {}
  for r in records:
    for key, value in r.items():
      if key not in ('phase', 'step') and isinstance(value, (int, float)):
        expected[(f'{r["phase"]}/{key}', r.get('step', 0))] = value
  assert scalars.keys() == expected.keys()
  for key, value in expected.items():
    assert scalars[key] == pytest.approx(value, rel=1e-6, abs=1e-30), key
  tags = {tag for tag, _ in scalars}
  # Per step, per epoch, the pruning's channel counts and FLOPs, after each event, the result.
  assert {'pretrain/train_loss', 'pretrain/test_accuracy', 'prune/decaying_channels',
          'prune/pruned_channels', 'prune/released_channels', 'prune/flops_ratio',
          'prune/event_flops_ratio', 'result/flops_ratio'} <= tags
  event_steps = sorted(s for tag, s in scalars if tag == 'prune/event_flops_ratio')
  assert event_steps == [1, 12]  # Events at counts 0 and 11 (a quarter of 44 steps).


def test_tensorboard_writer_frames_and_encodes_as_tensorflow_does(tmp_path):
  writer = tensorboard.EventWriter(tmp_path)
  writer.scalars(7, {'a/b': 0.5, 'c': -2.0}, wall_time=1.25)
  events = _read_events(writer.path)
  assert events == [
      {'step': 0, 'wall_time': events[0]['wall_time'], 'file_version': 'brain.Event:2'},
      {'step': 7, 'wall_time': 1.25, 'values': {'a/b': 0.5, 'c': -2.0}},
  ]
  # A known record: an Event with only step 1 (field 2, varint 1): bytes 10 01.
  assert tensorboard.record(b'\x10\x01') == (
      b'\x02\x00\x00\x00\x00\x00\x00\x00' + tensorboard.masked_crc32c(
          b'\x02\x00\x00\x00\x00\x00\x00\x00').to_bytes(4, 'little')
      + b'\x10\x01' + tensorboard.masked_crc32c(b'\x10\x01').to_bytes(4, 'little'))
  assert tensorboard.crc32c(b'123456789') == 0xE3069283  # The CRC-32C check value.


def test_resumed_metrics_rewrite_the_event_file(tmp_path):
  path = tmp_path / loop.METRICS_FILENAME
  writer = loop.MetricsWriter(path)
  for step in (1, 2, 3):
    writer.write({'phase': 'a', 'step': step, 'loss': float(step)})
  loop.MetricsWriter(path).resume('a', 2)  # A run resumed from step 2 drops step 3.
  (events_path,) = tmp_path.glob('events.out.tfevents.*')
  steps = [(e['step'], e['values']) for e in _read_events(events_path)[1:]]
  assert steps == [(1, {'a/loss': 1.0}), (2, {'a/loss': 2.0})]


def test_global_batch_needs_rows_for_every_local_device():
  mesh = parallel.create_mesh((('data', -1),))
  batch = parallel.global_batch({'x': np.arange(4.0)}, mesh)
  np.testing.assert_array_equal(parallel.to_host(batch)['x'], np.arange(4.0))
  assert batch['x'].sharding == parallel.batch_sharding(mesh)
