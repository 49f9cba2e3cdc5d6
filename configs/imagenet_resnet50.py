"""ResNet-50 on ImageNet (ILSVRC 2012), the standard 90-epoch recipe.

SGD lr 0.1 per 256 images, momentum 0.9, weight decay 1e-4, batch 256, 90 epochs,
lr / 10 at epochs 30 and 60 (He et al. 2016; torchvision's reference recipe, the
dense ResNet-50 that DepGraph and the other pruning papers start from).

  python -m train.main --config=configs/imagenet_resnet50.py --workdir=runs/imagenet_resnet50 \\
      --config.data_dir=/path/to/tensorflow_datasets

For another batch size, scale the rate linearly, e.g. `--config.batch_size=1024
--config.learning_rate=0.4 --config.warmup_epochs=5`.

Expected (published, not measured here: no ImageNet or GPU was available when this was
written): about 76.1% top-1 validation accuracy (torchvision: 76.13%); about 5004 steps
per epoch, i.e. one to two days on 8 modern GPUs with a fast input pipeline.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """ResNet-50 / ImageNet."""
  config = default.get_config()
  config.model = 'resnet50'
  config.dataset = 'imagenet2012'
  config.learning_rate = 0.1
  config.weight_decay = 1e-4
  config.lr_schedule = 'piecewise'
  config.lr_milestones = (30, 60)
  config.batch_size = 256
  config.num_epochs = 90
  config.eval_batch_size = 250
  config.log_every_steps = 500
  config.checkpoint_max_to_keep = 3
  return config
