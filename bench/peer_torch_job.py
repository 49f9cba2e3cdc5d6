"""The digits pruning job of `bench.peer_torch_pruning`, in PyTorch with Torch-Pruning.

  python -m bench.peer_torch_job --seed 0 --target 0.5 --out result.json [--threads 1]

The job of configs/digits_hard.py, with its settings from `bench.peer_torch_pruning.JOB`:
the digits CNN (conv 3x3 1->32 + BN + relu, conv 3x3 32->64 + BN + relu, 2x2 max pool,
flatten, dense 1024->128 + relu, dense 128->10; bias-free convs padded by one,
torchvision's initialisation for the convs, LeCun normal for the dense layers) on the same
stratified split and normalisation, trained with SGD (momentum 0.9, coupled weight decay
5e-4 on kernels only, batch 32, reshuffled every epoch, batches running across epochs, each
phase's stream starting afresh from the seed) in three phases: pretrain 10 epochs (lr 0.05,
cosine), prune 8 epochs (lr 0.01, constant), fine-tune 10 epochs (lr 0.01, cosine), with a
fresh optimizer per phase and the test set evaluated after every epoch.

The prune phase removes channels in 5 events spread over its first 4 epochs, event i
bringing the MACs to `1 - (1 - target) * (i + 1) / 5` of the dense network's. At each,
Torch-Pruning ranks every channel once, globally (the output layer ignored), and one pruner
step removes the fewest least important channels that meet the target, their number found
by bisection on copies of the network. The importance is Torch-Pruning's group magnitude
with p=2 over every slice of a channel (biases included); its square root divided by the
group's mean is the group L2 norm, normalised per group, that ours ranks by. Pruned
parameters are new tensors; their momentum is carried over (Torch-Pruning slices it with
them, held as their gradient), as ours keeps it.

What still differs from ours: the random draws (PyTorch's initialisation, numpy's batch
order: same distributions, other values); the flatten, in PyTorch's NCHW order (the dense
layer's input rows are a fixed permutation of ours: the same network); and where an event
lands: just under its target after the channel that crosses it, where ours then gives back
the most important channels taken that still fit (cheap dense channels, mostly) and swaps
to land within 0.5% of the dense MACs under it (seed 0 at 0.5: widths 24, 46, 20 there,
27, 41, 10 here; the dense channels cost little in MACs and much in parameters). MACs are
counted by `tp.utils.count_ops_and_params` over the conv and linear layers only, as ours
counts (plus the 138 additions of the linear biases). Removing one channel at a time
instead (Torch-Pruning's progressive pruning) ranks afresh after every channel; its group
means then shift as channels go, and a single event to 0.9 of the MACs cut the dense layer
from 128 to 19 channels where ranking once leaves 65.

Writes a JSON file with the final test accuracy, the dense and after-pruning accuracies,
the MACs and parameter ratios of the pruned network, its widths and the seconds of each part.
"""

import time

_START = time.perf_counter()  # Before the imports, which the seconds count.

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import copy
import importlib.metadata
import json
import math
from collections.abc import Callable

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F

from bench.peer_torch_pruning import JOB, digits_arrays

_IMPORTED = time.perf_counter()

CONV_WIDTHS = (32, 64)
DENSE_WIDTH = 128
NUM_CLASSES = 10
IMAGE_SIZE = 8


def digits_cnn() -> nn.Sequential:
  """The digits CNN, initialised as dpm_jax.models.DigitsCNN is."""
  (c1, c2), pooled = CONV_WIDTHS, IMAGE_SIZE // 2
  model = nn.Sequential(
      nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(),
      nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
      nn.MaxPool2d(2), nn.Flatten(),
      nn.Linear(c2 * pooled * pooled, DENSE_WIDTH), nn.ReLU(),
      nn.Linear(DENSE_WIDTH, NUM_CLASSES),
  )
  for layer in model:
    if isinstance(layer, nn.Conv2d):
      nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(layer, nn.Linear):
      # flax's lecun_normal: a normal truncated at two standard deviations, rescaled so that
      # the variance is 1 / fan_in.
      std = math.sqrt(1.0 / layer.in_features) / 0.87962566103423978
      nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
      nn.init.zeros_(layer.bias)
  return model


def macs_and_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
  """MACs of the conv and linear layers (what dpm_jax.flops counts) and all parameters."""
  _, params, layer_ops, _ = tp.utils.count_ops_and_params(model, example, layer_wise=True)
  macs = sum(ops for layer, ops in layer_ops.items() if isinstance(layer, (nn.Conv2d, nn.Linear)))
  return int(macs), int(params)


def sgd(model: nn.Module, learning_rate: float) -> torch.optim.SGD:
  kernels = [p for p in model.parameters() if p.ndim >= 2]
  others = [p for p in model.parameters() if p.ndim < 2]
  return torch.optim.SGD(
      [{"params": kernels, "weight_decay": JOB.weight_decay},
       {"params": others, "weight_decay": 0.0}],
      lr=learning_rate, momentum=JOB.momentum)


def cosine(peak: float, num_steps: int) -> Callable[[int], float]:
  return lambda step: peak * 0.5 * (1 + math.cos(math.pi * min(step, num_steps) / num_steps))


def batch_indices(num_train: int, num_steps: int, seed: int) -> np.ndarray:
  """[num_steps, batch] indices: a fresh permutation every epoch, batches across epochs."""
  rng = np.random.default_rng(seed)
  needed = num_steps * JOB.batch_size
  stream = np.concatenate([rng.permutation(num_train) for _ in range(-(-needed // num_train))])
  return stream[:needed].reshape(num_steps, JOB.batch_size)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
  model.eval()
  return (model(images).argmax(-1) == labels).float().mean().item()


Data = dict[str, tuple[torch.Tensor, torch.Tensor]]
# Called before every step of a phase with the step and the optimizer; returns the optimizer
# to use from then on.
BeforeStep = Callable[[int, torch.optim.SGD], torch.optim.SGD]


def train_phase(model: nn.Module, data: Data, *, num_epochs: int,
                learning_rate: Callable[[int], float], seed: int,
                before_step: BeforeStep | None = None) -> float:
  """Trains `model` for `num_epochs` with a fresh optimizer; returns the test accuracy."""
  images, labels = data["train"]
  steps_per_epoch = len(labels) // JOB.batch_size
  num_steps = num_epochs * steps_per_epoch
  optimizer = sgd(model, learning_rate(0))
  test = 0.0
  for step, idx in enumerate(torch.from_numpy(batch_indices(len(labels), num_steps, seed))):
    if before_step is not None:
      optimizer = before_step(step, optimizer)
    for group in optimizer.param_groups:
      group["lr"] = learning_rate(step)
    model.train()
    loss = F.cross_entropy(model(images[idx]), labels[idx])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if (step + 1) % steps_per_epoch == 0:
      test = accuracy(model, *data["test"])
  return test


def prunable_widths(model: nn.Sequential) -> list[int]:
  """The output widths of the conv and linear layers but the last (the classes)."""
  return [layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
          for layer in model if isinstance(layer, (nn.Conv2d, nn.Linear))][:-1]


class Events:
  """The prune phase's events: at each, Torch-Pruning removes channels down to a MACs target."""

  def __init__(self, model: nn.Sequential, example: torch.Tensor, targets: dict[int, float]):
    self.model, self.example, self.targets = model, example, targets
    self.dense_macs, _ = macs_and_params(model, example)
    # The square root of the mean over the group's slices of the summed squares, over its
    # mean: the group L2 norm, normalised per group (the mean over slices cancels).
    self.importance = tp.importance.GroupMagnitudeImportance(
        p=2, bias=True, normalizer=lambda imp: imp.sqrt() / imp.sqrt().mean())

  def prune(self, model: nn.Sequential, count: int) -> None:
    """Removes the `count` globally least important channels of `model` in one step."""
    if count == 0:
      return
    model.eval()  # Tracing runs the model: in train mode it would move BatchNorm's statistics.
    # A global step removes all channels but int(total * (1 - ratio)): this ratio leaves
    # exactly total - count.
    ratio = (count - 0.5) / sum(prunable_widths(model))
    pruner = tp.pruner.BasePruner(model, self.example, self.importance, global_pruning=True,
                                  pruning_ratio=ratio, ignored_layers=[model[-1]])
    pruner.step()

  def __call__(self, step: int, optimizer: torch.optim.SGD) -> torch.optim.SGD:
    if step not in self.targets:
      return optimizer
    # Torch-Pruning slices each parameter's gradient with it: it carries the momentum.
    for p in self.model.parameters():
      p.grad = optimizer.state.get(p, {}).get("momentum_buffer")
    # The fewest channels whose removal meets the target, by bisection on copies.
    target = self.targets[step] * self.dense_macs
    low, high = 0, sum(prunable_widths(self.model)) - 1
    while low < high:
      count = (low + high) // 2
      trial = copy.deepcopy(self.model)
      self.prune(trial, count)
      if macs_and_params(trial, self.example)[0] <= target:
        high = count
      else:
        low = count + 1
    self.prune(self.model, low)
    optimizer = sgd(self.model, optimizer.param_groups[0]["lr"])
    for p in self.model.parameters():
      if p.grad is not None:
        optimizer.state[p]["momentum_buffer"] = p.grad
      p.grad = None
    return optimizer


def run(seed: int, target: float) -> dict:
  """The whole job for one seed and MACs target; returns its results."""
  seconds = {"imports": _IMPORTED - _START}
  start = time.perf_counter()
  torch.manual_seed(seed)
  data = {name: (torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y))
          for name, (x, y) in digits_arrays().items()}
  model = digits_cnn()
  example = data["test"][0][:1]
  dense_macs, dense_params = macs_and_params(model, example)
  steps_per_epoch = len(data["train"][1]) // JOB.batch_size
  seconds["data and model"] = time.perf_counter() - start

  start = time.perf_counter()
  dense_accuracy = train_phase(
      model, data, num_epochs=JOB.pretrain_epochs, seed=seed,
      learning_rate=cosine(JOB.pretrain_lr, JOB.pretrain_epochs * steps_per_epoch))
  seconds["pretrain"] = time.perf_counter() - start

  start = time.perf_counter()
  events = Events(model, example, dict(zip(JOB.event_steps(steps_per_epoch),
                                           JOB.event_targets(target))))
  prune_accuracy = train_phase(model, data, num_epochs=JOB.prune_epochs, seed=seed,
                               learning_rate=lambda step: JOB.prune_lr, before_step=events)
  seconds["prune"] = time.perf_counter() - start

  start = time.perf_counter()
  final_accuracy = train_phase(
      model, data, num_epochs=JOB.finetune_epochs, seed=seed,
      learning_rate=cosine(JOB.finetune_lr, JOB.finetune_epochs * steps_per_epoch))
  seconds["finetune"] = time.perf_counter() - start

  macs, params = macs_and_params(model, example)
  return {
      "test_accuracy": final_accuracy,
      "dense_test_accuracy": dense_accuracy,
      "prune_test_accuracy": prune_accuracy,
      "flops_ratio": macs / dense_macs,
      "params_ratio": params / dense_params,
      "widths": prunable_widths(model),
      "seconds": seconds,
      "torch_threads": torch.get_num_threads(),
      # torch_pruning 1.6.1 says 1.6.0 in its __version__: ask the installed package.
      "versions": {p: importlib.metadata.version(p) for p in ("torch", "torch-pruning")},
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--target", type=float, default=0.5,
                      help="fraction of the dense MACs to prune to")
  parser.add_argument("--out", required=True, help="where to write the results (JSON)")
  parser.add_argument("--threads", type=int, default=0,
                      help="PyTorch's intra-op threads; 0: its default (one per core)")
  args = parser.parse_args()
  if not 0.0 < args.target <= 1.0:
    parser.error(f"--target {args.target}: must be in (0, 1].")
  if args.threads:
    torch.set_num_threads(args.threads)
  result = run(args.seed, args.target)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps({k: v for k, v in result.items() if k != "seconds"}))


if __name__ == "__main__":
  main()
