"""The methods matrix on CIFAR-10, as the papers ran it: one config per method by name.

  python -m train.main --config=configs/cifar10_matrix.py:otov2+sr --workdir=runs/vgg_otov2_sr \\
      --config.data_dir=/path/to/tensorflow_datasets
  python -m bench.methods --datasets cifar10 --budgets 0.47 --seeds 0 \\
      --override=--config.data_dir=/path/to/tensorflow_datasets

The argument after the colon is a method of `bench/methods.py` (`depgraph`, `depgraph+sp`,
`depgraph+sr`, the same for `depgraph_sl`, `gate_decorator` and `otov2`; `sfp`,
`sfp_scratch`, `psap`, `psap_scratch`). The DPM paper's networks: DepGraph (with and without
sparse learning), SFP and PSAP prune ResNet-56 (configs/cifar10_resnet56_dpm.py,
cifar10_resnet56_depgraph_sl.py, cifar10_resnet56_psap.py); Gate Decorator and OTOv2 prune
VGG-16-BN (configs/cifar10_vgg16_gate_decorator.py, cifar10_vgg16_otov2.py). `+sp` and `+sr`
set the removal to DPM's smooth pruning and self-rectifying. From scratch: no pretraining,
the prune phase as long as the pretraining (200 epochs) with its learning-rate schedule.
The budget is each config's own (the paper's row) unless `--config.pruning.target_flops`
says otherwise. Not run here (no CIFAR-10 and no accelerator on the development machine):
most cells take most of a day on one GPU.
"""

import ml_collections

from configs import cifar10_resnet56_depgraph_sl
from configs import cifar10_resnet56_dpm
from configs import cifar10_resnet56_psap
from configs import cifar10_vgg16_gate_decorator
from configs import cifar10_vgg16_otov2

_BASES = {
    'depgraph': cifar10_resnet56_dpm,
    'depgraph_sl': cifar10_resnet56_depgraph_sl,
    'gate_decorator': cifar10_vgg16_gate_decorator,
    'otov2': cifar10_vgg16_otov2,
}
_REMOVALS = {'': 'hard', '+sp': 'dpm_sp', '+sr': 'dpm'}
METHODS = tuple(f'{b}{r}' for b in _BASES for r in _REMOVALS) + (
    'sfp', 'sfp_scratch', 'psap', 'psap_scratch')


def _from_scratch(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """No pretraining: the prune phase trains from initialisation for as long, and at the
  learning rate and schedule, the pretraining had; events until its end."""
  pruning = config.pruning
  pruning.epochs = float(config.num_epochs)
  pruning.end_epoch = pruning.epochs
  pruning.learning_rate = config.learning_rate
  pruning.lr_schedule = config.lr_schedule
  config.num_epochs = 0
  return config


def get_config(method: str = 'depgraph+sr') -> ml_collections.ConfigDict:
  """The CIFAR-10 config of `method` (see the module docstring)."""
  if method not in METHODS:
    raise ValueError(f'configs/cifar10_matrix.py: unknown method {method!r}; choose one of '
                     f'{", ".join(METHODS)} (e.g. --config=configs/cifar10_matrix.py:otov2+sr).')
  if method.startswith(('sfp', 'psap')):
    if method.startswith('psap'):
      config = cifar10_resnet56_psap.get_config()
    else:
      config = cifar10_resnet56_dpm.get_config()
      config.pruning.method = 'sfp'
      config.pruning.removal = 'soft'
      config.pruning.end_epoch = config.pruning.epochs  # The last event at the phase's end.
      config.pruning.interval_epochs = 1.0
    return _from_scratch(config) if method.endswith('_scratch') else config
  base, _, removal = method.partition('+')
  config = _BASES[base].get_config()
  config.pruning.removal = _REMOVALS['+' + removal if removal else '']
  return config
