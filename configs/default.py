"""Default hyperparameters: every field of a training config, with DepGraph's CIFAR recipe.

ResNet-56 on CIFAR-10 with SGD (lr 0.1, momentum 0.9, weight decay 5e-4, batch 128)
for 200 epochs, the learning rate divided by 10 at epochs 120, 150 and 180: the
dense-network setting of DepGraph (Fang et al., CVPR 2023) and of Torch-Pruning's
CIFAR benchmarks. Other configs import this one and override fields.

  python -m train.main --config=configs/default.py --workdir=runs/default \\
      --config.data_dir=/path/to/tensorflow_datasets

Expects CIFAR-10 prepared as array_record under `data_dir` (see `dpm_jax.data`);
same result and time as configs/cifar10_resnet56.py.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The default config."""
  config = ml_collections.ConfigDict()

  # Model and data.
  config.model = 'resnet56'  # A name in `dpm_jax.models.MODELS`.
  # Extra constructor arguments of the model (its widths), e.g. {'stage_widths': (8, 16, 32)}.
  config.model_kwargs = ml_collections.ConfigDict()
  config.dataset = 'cifar10'  # A name in `dpm_jax.data.DATASETS`.
  # TFDS data directory; None: $TFDS_DATA_DIR or ~/tensorflow_datasets (digits and mnist1d are
  # prepared there).
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.augment = True  # Training-time augmentation (CIFAR: pad-crop-flip; digits, mnist1d: none).
  config.seed = 0  # Seeds the model initialisation and the order of training batches.

  # Devices. A mesh over every device of every process, as (axis name, size) pairs (-1: the
  # devices the other axes leave); each batch is split over all its axes (data parallel),
  # so batch_size and eval_batch_size must be multiples of the number of devices.
  config.mesh = (('data', -1),)
  # '': params, batch statistics and optimizer state (pruning state included) replicated on
  # every device. A mesh axis name: each of their arrays split along it on its largest
  # dimension that the axis divides (as FSDP does), to fit models larger than one device.
  config.state_axis = ''

  # Optimisation. Weight decay is L2 on conv/dense kernels only (not biases, not BatchNorm).
  config.optimizer = 'sgd'  # 'sgd' (with momentum) or 'adam'.
  config.learning_rate = 0.1  # Peak learning rate (after warmup).
  config.momentum = 0.9  # SGD momentum; 0 for plain SGD.
  config.nesterov = False  # SGD with Nesterov momentum.
  config.adam_b1 = 0.9  # Adam's first-moment decay.
  config.adam_b2 = 0.999  # Adam's second-moment decay.
  config.weight_decay = 5e-4  # L2 coefficient: wd * kernel is added to the kernel's gradient.
  config.lr_schedule = 'piecewise'  # 'constant', 'cosine' (to 0 at the end) or 'piecewise'.
  config.lr_milestones = (120, 150, 180)  # 'piecewise': epochs at which the rate is multiplied...
  config.lr_decay_factor = 0.1  # ... by this factor.
  config.warmup_epochs = 0.0  # Linear warmup from 0 over this many epochs (may be fractional).
  config.batch_size = 128  # Training batch size.
  config.num_epochs = 200  # Training length, in passes over the training set (may be fractional).

  # Evaluation, logging and checkpoints.
  config.eval_batch_size = 500  # Test batch size (the last batch is padded and masked).
  config.eval_every_epochs = 1  # Evaluate on the test set every this many epochs (and at the end).
  config.log_every_steps = 100  # Write train loss/accuracy to metrics.jsonl every this many steps.
  config.checkpoint_every_epochs = 1  # Checkpoint every this many epochs (and at the end).
  config.checkpoint_max_to_keep = 2  # Checkpoints kept per phase (older ones are deleted).
  config.progress_bar = True  # Show a tqdm progress bar per epoch.
  # JAX's persistent compilation cache: a second run of the same job (or a resumed one) loads
  # its compiled steps instead of compiling them again. '' turns it off.
  config.compilation_cache = '~/.cache/dpm_jax/jax'

  # Pruning (off by default): after the dense 'pretrain' phase, a 'prune' phase trains with
  # dpm_jax.prune, then the pruning is made final, channels are removed by surgery, and the
  # smaller network is fine-tuned ('finetune'), exported and reported (report.md).
  config.pruning = pruning = ml_collections.ConfigDict()
  pruning.enabled = False
  # Fields below that a method's parts do not take are ignored (num_events for 'sfp',
  # interval_epochs for 'depgraph', decay_steps for removal 'hard', ...).
  # A preset in dpm_jax.recipes.PRESETS: 'depgraph', 'magnitude', 'sfp', 'psap',
  # 'gate_decorator', 'otov2'.
  pruning.method = 'depgraph'
  pruning.criterion = ''  # Override the preset's criterion ('l1', 'l2', 'group_l2'); '' keeps it.
  # Override the preset's allocation ('global', 'uniform', 'adaptive', 'widths'); '' keeps it.
  pruning.allocation = ''
  # 'widths': the channels every group ends with, in the spec's group order, e.g. the
  # `widths` of another run's result.json: --config.pruning.widths='(8, 13, 20)'.
  pruning.widths = ()
  # 'hard' (base method), 'soft' (SFP's base), 'dpm_sp' (+ smooth pruning), 'dpm' (+ SR).
  pruning.removal = 'dpm'
  pruning.target_flops = 0.5  # Fraction of the dense network's FLOPs that remains.
  # Every group keeps a multiple of this many channels (or all of them). 1: any width. On
  # GPUs 8 and on TPUs 128 (the lanes) let the pruned layers run at full speed; uneven widths
  # can make a pruned network no faster than the dense one.
  pruning.round_to = 1
  # What target_flops is a fraction of: 'flops' (MACs counted from the trace) or 'latency'
  # (the network's latency on this device, predicted from a table of every layer timed at
  # widths in multiples of latency_step, measured when the run plans its prune phase and
  # cached in ~/.cache/dpm_jax/latency; round_to must then be a multiple of latency_step).
  pruning.cost = 'flops'
  pruning.latency_step = 8  # Widths the latency table times: multiples of this (and the full).
  # Batch the latency is timed at; None: batch_size.
  pruning.latency_batch = ml_collections.config_dict.placeholder(int)
  pruning.min_channels = 1  # Never leave a group with fewer channels than this...
  # ... or than this fraction of its channels; None: the method's ('gate_decorator': 0.1, else 0).
  pruning.min_fraction = ml_collections.config_dict.placeholder(float)
  pruning.epochs = 20.0  # Length of the prune phase, in epochs.
  pruning.start_epoch = 0.0  # First pruning event, in epochs from the start of the phase.
  pruning.end_epoch = 10.0  # Last pruning event (== start_epoch: one-shot).
  pruning.num_events = 5  # Pruning events from start_epoch to end_epoch, each a step down in FLOPs.
  # 'sfp', 'psap': an event (a fresh selection) every this many epochs, and at end_epoch.
  pruning.interval_epochs = 1.0
  # Removals 'soft', 'protective': zero a filter's 'weights' (SFP: BatchNorm stays, so it can
  # regrow) or all its 'producers' (kernel, bias, BatchNorm scale and bias: output zero);
  # None: the method's default ('weights').
  pruning.zero = ml_collections.config_dict.placeholder(str)
  # Criteria 'l1', 'l2': rank by the kernel slices only (SFP's filter norm); None: the
  # method's default ('sfp': True, the others: False).
  pruning.weights_only = ml_collections.config_dict.placeholder(bool)
  pruning.decay_steps = 400  # DPM's N: optimizer steps a selected channel takes to reach zero.
  pruning.rate_threshold = 0.0  # T_rate: release when the norm-growth rate EMA exceeds this...
  pruning.len_threshold = 1.0  # ... and (logic) the relative gradient-norm EMA this (T_len).
  pruning.logic = 'and'  # 'and' or 'or' of the two self-rectifying tests.
  # Decay of the gradient-history EMAs; None: the removal's default ('dpm': 0.5, chosen by
  # bench/dpm_ablation.py; 'protective', PSAP's pulses: 0.9).
  pruning.ema_decay = ml_collections.config_dict.placeholder(float)
  pruning.min_decay_steps = 10  # Decay steps before a channel may be released.
  pruning.cooldown = 400  # Steps after a release before the channel may be selected again.
  # Releases stop this many epochs after the last event, so that every replacement finishes
  # its decay within the phase; None: one decay (decay_steps).
  pruning.release_epochs = ml_collections.config_dict.placeholder(float)
  # PSAP ('psap': allocation 'adaptive', removal 'protective'); None: the method's default.
  pruning.sparsity = ml_collections.config_dict.placeholder(str)  # 'weights' or 'channels'.
  # 'weights': a group's sparsity is its share of kernel entries below this times the mean
  # magnitude of their layer...
  pruning.sparsity_threshold = ml_collections.config_dict.placeholder(float)
  # ... 'channels': its share of channels whose norm is below this times the group median.
  pruning.channel_fraction = ml_collections.config_dict.placeholder(float)
  pruning.p_min = ml_collections.config_dict.placeholder(float)  # Each group's ratio bounds.
  pruning.p_max = ml_collections.config_dict.placeholder(float)
  pruning.gamma = ml_collections.config_dict.placeholder(float)  # Pulse threshold (restore).
  pruning.protect_events = ml_collections.config_dict.placeholder(int)  # Events protected.
  # A zeroed channel's pulse is over the mean of its group's 'zeroed' or 'active' channels.
  pruning.reference = ml_collections.config_dict.placeholder(str)
  # DepGraph's sparse learning ('depgraph'): group lasso from the start of the phase.
  pruning.sparse_learning = False
  pruning.reg = ml_collections.config_dict.placeholder(float)  # Its strength (5e-4)...
  pruning.alpha = ml_collections.config_dict.placeholder(float)  # ... and spread (16).
  # Gate Decorator ('gate_decorator'): a tick every tick_epochs removes tick_fraction of the
  # remaining FLOPs (from start_epoch until end_epoch or the target); after ticks_per_tock
  # ticks a tock of tock_epochs trains with gate_l1 times L1 on the gates.
  pruning.tick_epochs = ml_collections.config_dict.placeholder(float)
  pruning.ticks_per_tock = ml_collections.config_dict.placeholder(int)
  pruning.tock_epochs = ml_collections.config_dict.placeholder(float)
  pruning.tick_fraction = ml_collections.config_dict.placeholder(float)
  pruning.gate_l1 = ml_collections.config_dict.placeholder(float)
  # OTOv2 ('otov2'): the push on redundant channels and the half-space threshold.
  pruning.lmbda = ml_collections.config_dict.placeholder(float)
  pruning.eps = ml_collections.config_dict.placeholder(float)
  pruning.learning_rate = 0.01  # Peak learning rate of the prune phase.
  pruning.lr_schedule = 'constant'  # Its schedule ('constant', 'cosine', 'piecewise').
  pruning.record_every_steps = 5  # Record channel norms for the report's decay plot this often.
  pruning.finetune_epochs = 100.0  # Fine-tuning of the pruned network after surgery.
  pruning.finetune_learning_rate = 0.01  # Its peak learning rate...
  pruning.finetune_lr_schedule = 'cosine'  # ... and schedule.

  return config
