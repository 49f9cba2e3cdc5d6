"""The small vision transformer on scikit-learn's 8x8 handwritten digits.

  python -m train.main --config=configs/digits_vit.py --workdir=runs/digits_vit

2x2 patches (16 tokens), two pre-norm blocks of 4 heads of size 8 and an MLP of 64 units
(`dpm_jax.models.DigitsViT`), trained with Adam. Expected: see the README's transformer
section for the measured accuracy and time.
"""

import ml_collections

from configs import digits


def get_config() -> ml_collections.ConfigDict:
  """digits_vit / digits."""
  config = digits.get_config()
  config.model = 'digits_vit'
  # The attention form: 'einsum' (by hand), 'jax' (jax.nn.dot_product_attention) or 'flax'
  # (nnx.MultiHeadAttention); the groups and the pruned model are the same.
  config.model_kwargs = ml_collections.ConfigDict({'attention': 'einsum'})
  config.optimizer = 'adam'
  config.learning_rate = 3e-3
  config.weight_decay = 1e-4
  config.warmup_epochs = 1.0
  config.num_epochs = 20
  return config
