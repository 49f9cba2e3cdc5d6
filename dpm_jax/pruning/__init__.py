"""Pruning as an optax transform: recipes composed of parts, and the transform that runs them.

- ``base``: the protocol of each kind of part (``Criterion``, ``Allocation``, ``Schedule``,
  ``Removal``, ``Regularizer``) and what they all read (``Context``, ``Step``).
- ``criteria``, ``allocations``, ``schedules``, ``removals``, ``regularizers``: the parts.
- ``state``: ``PruneState``, the pruning state that rides in the optimizer state.
- ``recipes``: ``Recipe``, the registry of names and the presets (``depgraph``, ``magnitude``,
  ``sfp``, ``psap``, ``gate_decorator``, ``otov2``).
- ``transform``: ``prune`` and the functions that read its state.
"""

from dpm_jax.pruning import allocations
from dpm_jax.pruning import criteria
from dpm_jax.pruning import recipes
from dpm_jax.pruning import regularizers
from dpm_jax.pruning import removals
from dpm_jax.pruning import schedules
from dpm_jax.pruning.base import ACTIVE
from dpm_jax.pruning.base import DECAYING
from dpm_jax.pruning.base import PRUNED
from dpm_jax.pruning.base import PUSHED
from dpm_jax.pruning.base import SOFT
from dpm_jax.pruning.base import Allocation
from dpm_jax.pruning.base import Context
from dpm_jax.pruning.base import Criterion
from dpm_jax.pruning.base import Regularizer
from dpm_jax.pruning.base import Removal
from dpm_jax.pruning.base import Schedule
from dpm_jax.pruning.base import Step
from dpm_jax.pruning.recipes import Recipe
from dpm_jax.pruning.state import PruneState
from dpm_jax.pruning.state import channel_status
from dpm_jax.pruning.state import given_back
from dpm_jax.pruning.state import ratios
from dpm_jax.pruning.transform import PruneOptState
from dpm_jax.pruning.transform import finalize
from dpm_jax.pruning.transform import inner_state
from dpm_jax.pruning.transform import keep_masks
from dpm_jax.pruning.transform import prune
from dpm_jax.pruning.transform import prune_state

__all__ = [
    "ACTIVE",
    "DECAYING",
    "PRUNED",
    "PUSHED",
    "SOFT",
    "Allocation",
    "Context",
    "Criterion",
    "PruneOptState",
    "PruneState",
    "Recipe",
    "Regularizer",
    "Removal",
    "Schedule",
    "Step",
    "allocations",
    "channel_status",
    "criteria",
    "finalize",
    "given_back",
    "inner_state",
    "keep_masks",
    "prune",
    "prune_state",
    "ratios",
    "recipes",
    "regularizers",
    "removals",
    "schedules",
]
