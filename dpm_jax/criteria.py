"""Channel importance scores, flat ``[K]`` over all groups (see ``dpm_jax.channels``).

Example:

  >>> import jax.numpy as jnp
  >>> from dpm_jax import groups, channels, criteria
  >>> def mlp(v, x):
  ...   return jnp.maximum(x @ v['w1'], 0) @ v['w2']
  >>> v = {'w1': jnp.array([[1., 2.], [1., 2.]]), 'w2': jnp.ones((2, 1))}
  >>> index = channels.ChannelIndex.build(groups.trace_groups_fn(mlp, v, jnp.zeros((1, 2))))
  >>> criteria.score("l1", index, v).tolist()
  [2.0, 4.0]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dpm_jax import channels
from dpm_jax.groups import CONSUMER, PRODUCER

__all__ = ["score", "normalize"]


def score(criterion: str, index: channels.ChannelIndex, params: Any) -> jax.Array:
  """``[K]`` importance of every channel under ``criterion``.

  ``l1``/``l2``: the norm of the channel's producer slices (kernel output slice, bias,
  normalisation scale and bias). ``group_l2``: L2 over all its parameter slices, consumers'
  input slices included (DepGraph's group importance).
  """
  if criterion == "l1":
    return channels.abs_sums(index, params)
  if criterion == "l2":
    return jnp.sqrt(channels.sq_norms(index, params))
  if criterion == "group_l2":
    return jnp.sqrt(channels.sq_norms(index, params, roles=(PRODUCER, CONSUMER)))
  raise ValueError(f"Unknown criterion {criterion!r}; choose l1, l2 or group_l2.")


def normalize(index: channels.ChannelIndex, scores: jax.Array,
              where: jax.Array | None = None) -> jax.Array:
  """Scores divided by their group's mean, so groups of different scale compare (DepGraph).

  The mean is over the channels in ``where`` (default: all): pass the kept channels, as
  DepGraph's removed channels are gone from the layer it normalises over.
  """
  where = jnp.ones_like(scores, bool) if where is None else where
  mean = channels.segment_mean(index, scores, where)
  return scores / jnp.maximum(mean, 1e-12)
