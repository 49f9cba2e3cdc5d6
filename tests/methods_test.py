"""The methods matrix (bench/methods.py): its cells, a tiny run of one twice, its table."""

import json

import pytest

from bench import methods


def test_every_method_has_a_config_on_both_datasets():
  for dataset in ('mnist1d', 'digits'):
    found = {c.method for c in methods.cells([dataset], methods.METHODS, [0.5], [0])}
    assert found == set(methods.METHODS), dataset


def test_the_cifar10_matrix_has_every_method_and_each_config_can_work():
  from configs import cifar10_matrix  # pylint: disable=g-import-not-at-top
  from train import pruning, train  # pylint: disable=g-import-not-at-top
  cells = methods.cells(['cifar10'], methods.METHODS, [0.47], [0])
  assert {c.method for c in cells} == set(methods.METHODS) == set(cifar10_matrix.METHODS)
  models = {}
  for cell in cells:
    assert cell.config == f'configs/cifar10_matrix.py:{cell.method}'
    config = cifar10_matrix.get_config(cell.method)
    config.pruning.target_flops = cell.budget
    train.validate_config(config)
    steps_per_epoch = 50_000 // config.batch_size
    pruning.validate_pruning_config(config, steps_per_epoch)
    base, _, removal = cell.method.partition('+')
    assert config.pruning.removal == {'': config.pruning.removal, 'sp': 'dpm_sp',
                                      'sr': 'dpm'}[removal]
    assert (config.num_epochs == 0) == cell.method.endswith('_scratch')
    models[base] = config.model
  # The DPM paper's networks: ResNet-56 for DepGraph, VGG-16-BN for Gate Decorator and OTOv2.
  assert models['depgraph'] == models['psap'] == 'resnet56'
  assert models['gate_decorator'] == models['otov2'] == 'vgg16_bn'
  with pytest.raises(ValueError, match='unknown method'):
    cifar10_matrix.get_config('depgraph+xx')


def test_a_cell_is_one_command_line_run():
  (cell,) = methods.cells(['mnist1d'], ['depgraph+sr'], [0.1], [2])
  command = cell.command('w')
  assert command[1:] == ['-m', 'train.main', '--config=configs/mnist1d_dpm.py', '--workdir=w',
                         '--config.seed=2', '--config.pruning.target_flops=0.1',
                         '--config.progress_bar=False']


# A cell shortened to seconds: 1 + 2 + 1 epochs of the digits CNN.
SHORT = ['--override=--config.num_epochs=1', '--override=--config.pruning.epochs=2',
         '--override=--config.pruning.end_epoch=0.5', '--override=--config.pruning.decay_steps=5',
         '--override=--config.pruning.min_decay_steps=2',
         '--override=--config.pruning.finetune_epochs=1']


def test_a_cell_run_twice_gives_the_same_result_and_finished_cells_are_skipped(tmp_path, capsys):
  args = ['--datasets', 'digits', '--methods', 'depgraph+sr', '--budgets', '0.5', '--seeds',
          '0', *SHORT]
  records = []
  # 'a' resumes from the seed's shared pretraining, 'b' runs the cell's command as it is.
  for out, cold in ((tmp_path / 'a', []), (tmp_path / 'b', ['--cold'])):
    methods.main([*args, '--out', str(out), *cold])
    (line,) = (out / 'results.jsonl').read_text().splitlines()
    records.append(json.loads(line))
  first, again = records
  assert 'error' not in first, first
  assert first['warm_start'] and not again['warm_start']
  (shared,) = (tmp_path / 'a' / 'pretrained').iterdir()
  assert sorted(p.name for p in shared.iterdir()) == ['metrics.jsonl', 'pretrain']
  assert not (tmp_path / 'b' / 'pretrained').exists()
  for key in ('dense_test_accuracy', 'surgery_test_accuracy', 'test_accuracy', 'flops_ratio',
              'params_ratio',
              'releases'):
    assert first[key] == again[key], key
  assert abs(first['flops_ratio'] - 0.5) < 0.02
  table = (tmp_path / 'a' / 'table.md').read_text()
  assert '### digits, 0.5 of the dense FLOPs' in table and 'DepGraph + SR (DPM)' in table
  assert (tmp_path / 'a' / 'accuracy_vs_flops_digits.png').read_bytes()[:4] == b'\x89PNG'
  # Started again, nothing is left to run.
  capsys.readouterr()
  methods.main([*args, '--out', str(tmp_path / 'a')])
  assert '0 runs to do, 1 finished' in capsys.readouterr().out
  assert len((tmp_path / 'a' / 'results.jsonl').read_text().splitlines()) == 1


def test_a_failed_run_is_recorded_with_its_error(tmp_path):
  methods.main(['--datasets', 'digits', '--methods', 'depgraph', '--budgets', '0.5',
                '--seeds', '0', '--out', str(tmp_path),
                '--override=--config.pruning.min_channels=1000'])
  (line,) = (tmp_path / 'results.jsonl').read_text().splitlines()
  record = json.loads(line)
  assert 'cannot be met' in record['error']
  assert 'failed' in (tmp_path / 'table.md').read_text()


def test_the_readme_table_is_written_between_its_markers(tmp_path):
  readme = tmp_path / 'README.md'
  readme.write_text(f'# x\n\n{methods.README_START}\nold\n{methods.README_END}\nafter\n')
  record = {'key': 'mnist1d/depgraph/0.1/0', 'dataset': 'mnist1d', 'method': 'depgraph',
            'budget': 0.1, 'seed': 0, 'dense_test_accuracy': 0.97,
            'surgery_test_accuracy': 0.95, 'test_accuracy': 0.96, 'flops_ratio': 0.099,
            'params_ratio': 0.2, 'releases': 0, 'wall_s': 30.0}
  methods.update_readme(readme, {record['key']: record})
  text = readme.read_text()
  assert 'old' not in text and text.endswith(f'{methods.README_END}\nafter\n')
  assert '| DepGraph | 1 | 97.0 | 95.0 | 96.0 | 9.9% | 20.0% | 0 | 30 |' in text


def test_the_paper_comparison_puts_our_gains_beside_the_published_ones():
  results = {}
  for method, accs in (('otov2', (0.950, 0.960)), ('otov2+sp', (0.955, 0.965)),
                       ('otov2+sr', (0.970, 0.972))):
    for seed, acc in enumerate(accs):
      key = f'mnist1d/{method}/0.1/{seed}'
      results[key] = {'key': key, 'dataset': 'mnist1d', 'method': method, 'budget': 0.1,
                      'seed': seed, 'test_accuracy': acc}
  text = methods.paper_comparison(results)
  row = next(line for line in text.splitlines() if line.startswith('| OTOv2 |'))
  assert '93.40 / 93.60 / 93.80 (26.5 / 26.4 / 25.8%) | +0.20, +0.40' in row
  # Means 95.5 / 96.0 / 97.1; the largest std over seeds is 0.7 (base and + SP).
  assert row.endswith('95.5 / 96.0 / 97.1 (+- 0.7, 2 seeds) | +0.5, +1.6 |')
  assert methods.paper_comparison({}) == ''


def test_the_dpm_ablation_varies_one_knob_at_a_time_from_a_pinned_baseline():
  from bench import dpm_ablation  # pylint: disable=g-import-not-at-top
  cells = dpm_ablation.sensitivity_cells(0.1, [0, 1], dpm_ablation.BASELINE)
  flags = lambda c: dict(o.removeprefix('--config.pruning.').split('=') for o in c.overrides)
  baseline = {k: str(v) for k, v in dpm_ablation.BASELINE.items()}
  for cell in cells:
    assert cell.config == 'configs/mnist1d_dpm.py' and set(flags(cell)) == set(baseline)
    differ = {k for k, v in flags(cell).items() if v != baseline[k]}
    if cell.variant == 'default':
      assert not differ
    elif cell.variant != 'chosen':
      (knob,) = differ
      assert cell.variant == f'{knob}={flags(cell)[knob]}'
  assert len({c.key for c in cells}) == len(cells)
  values = sum(len(v) - 1 for v in dpm_ablation.KNOBS.values())
  assert len(cells) == 2 * (1 + values + 1)
  widths = dpm_ablation.widths_cell('depgraph', 0.1, 0, [8, 25, 15])
  assert widths.overrides == ('--config.pruning.allocation=widths',
                              '--config.pruning.widths=(8, 25, 15,)')
  assert widths.key == 'mnist1d/depgraph@sr_widths/0.1/0'
