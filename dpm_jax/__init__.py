"""dpm_jax: structured pruning for JAX/Flax.

Automatic channel groups (``trace_groups``), FLOP counting (``count_flops``), measured latency
(``latency``), parameter surgery (``remove_channels``), and the pruning methods as an optax
transform.
"""

from dpm_jax import channels
from dpm_jax import latency
from dpm_jax import models
from dpm_jax import pruning
from dpm_jax.pruning import recipes
from dpm_jax.flops import FlopsReport
from dpm_jax.flops import LayerCount
from dpm_jax.flops import count_flops
from dpm_jax.flops import count_flops_fn
from dpm_jax.flops import spec_cost
from dpm_jax.groups import Group
from dpm_jax.groups import GroupSpec
from dpm_jax.groups import Member
from dpm_jax.groups import UnsupportedPrimitiveError
from dpm_jax.groups import trace_groups
from dpm_jax.groups import trace_groups_fn
from dpm_jax.surgery import SurgeryCheckError
from dpm_jax.surgery import check_keep
from dpm_jax.surgery import register_module_resizer
from dpm_jax.surgery import remove_channels
from dpm_jax.surgery import remove_channels_fn
from dpm_jax.surgery import remove_channels_opt_state
from dpm_jax.surgery import zero_channels
from dpm_jax.pruning import PruneOptState
from dpm_jax.pruning import PruneState
from dpm_jax.pruning import Recipe
from dpm_jax.pruning import finalize
from dpm_jax.pruning import inner_state
from dpm_jax.pruning import keep_masks
from dpm_jax.pruning import prune
from dpm_jax.pruning import prune_state

__version__ = "0.1.0"

__all__ = [
    "FlopsReport",
    "PruneOptState",
    "PruneState",
    "Recipe",
    "finalize",
    "inner_state",
    "keep_masks",
    "prune",
    "prune_state",
    "pruning",
    "recipes",
    "Group",
    "GroupSpec",
    "LayerCount",
    "Member",
    "UnsupportedPrimitiveError",
    "channels",
    "check_keep",
    "count_flops",
    "count_flops_fn",
    "latency",
    "models",
    "register_module_resizer",
    "SurgeryCheckError",
    "remove_channels",
    "remove_channels_fn",
    "remove_channels_opt_state",
    "spec_cost",
    "trace_groups",
    "trace_groups_fn",
    "zero_channels",
]
