"""Data parallelism with JAX's own machinery: a `Mesh`, `NamedSharding`s, `jax.distributed`.

A run builds one `jax.sharding.Mesh` over every device of every process (`create_mesh`,
from `config.mesh`). Each batch is one global array split along the batch dimension over
all the mesh's axes (`batch_sharding`, `global_batch`: every process contributes the rows
it read). The train state is replicated, or each leaf split along one mesh axis
(`state_sharding`, `config.state_axis`); the jitted steps keep it that way. Every pruning
decision is computed inside jit on these global arrays, so all devices and processes take
the same one; what needs host values (surgery, reports) reads `to_host` copies.

  >>> import jax, numpy as np
  >>> mesh = create_mesh((('data', -1),))
  >>> mesh.axis_names, mesh.size == jax.device_count()
  (('data',), True)
  >>> batch = global_batch({'label': np.arange(8, dtype=np.int32)}, mesh)
  >>> batch['label'].sharding.spec
  P('data',)

Several processes (one per host, or several on one machine) call `initialize` first; each
then reads `1 / jax.process_count()` of every batch (`data_shard`).
"""

from collections.abc import Mapping, Sequence
import math
from typing import Any

import grain
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

PyTree = Any


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
  """`jax.distributed.initialize`: joins this process to a run of several.

  Must come before anything else touches JAX's devices. Arguments left None are detected by
  JAX where it knows the cluster (Cloud TPU, SLURM, Open MPI, Kubernetes);
  `coordinator_address` may also come from `JAX_COORDINATOR_ADDRESS`. On CPUs the processes
  exchange data with JAX's CPU collectives (gloo).

  Example (two processes on one machine, each run with its own process id)::

    initialize('localhost:12355', num_processes=2, process_id=0)
  """
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def create_mesh(axes: Sequence[tuple[str, int]]) -> Mesh:
  """A mesh over every device (of every process), axes named and sized by `axes`.

  Args:
    axes: (name, size) pairs, outermost first; at most one size may be -1: the devices
      left over by the others.

  Raises:
    ValueError: the sizes do not multiply to the number of devices, or a name repeats.

  Example:
    >>> create_mesh((('data', -1),)).shape['data'] == jax.device_count()
    True
  """
  axes = tuple((str(name), int(size)) for name, size in axes)
  names = [name for name, _ in axes]
  count = jax.device_count()
  if not axes or len(set(names)) != len(names):
    raise ValueError(f'mesh axes {axes!r}: give one or more (name, size) pairs with distinct '
                     "names, e.g. (('data', -1),).")
  sizes = [size for _, size in axes]
  known = math.prod(s for s in sizes if s != -1)
  if sizes.count(-1) > 1 or any(s < 1 and s != -1 for s in sizes) or count % known:
    raise ValueError(f'mesh axes {axes!r} do not fit the {count} devices: the sizes must '
                     f'multiply to {count}, with at most one -1 (the rest of the devices).')
  sizes = [count // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != count:
    raise ValueError(f'mesh axes {axes!r} cover {math.prod(sizes)} devices, not the {count} '
                     'there are; make one size -1 to take the rest.')
  return jax.make_mesh(tuple(sizes), tuple(names),
                       axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows of a batch split over every device: its first dimension over all mesh axes."""
  return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  """A whole copy on every device of `mesh`."""
  return NamedSharding(mesh, P())


def state_sharding(tree: PyTree, mesh: Mesh, axis: str | None = None) -> PyTree:
  """Where each leaf of a train state lives: replicated, or split along mesh axis `axis`.

  With `axis`, a leaf is split along its largest dimension that the axis size divides (as
  FSDP / ZeRO-3 split weights and optimizer moments); leaves with no such dimension
  (scalars, small vectors) stay replicated. Only shapes are read, so `tree` may hold
  tracers or `jax.ShapeDtypeStruct`s.

  Example:
    >>> mesh = create_mesh((('data', -1),))
    >>> state_sharding({'w': jax.ShapeDtypeStruct((3, 8), 'float32')}, mesh)['w'].spec
    P()
  """
  if not axis:
    return jax.tree.map(lambda _: replicated(mesh), tree)
  if axis not in mesh.axis_names:
    raise ValueError(f'state axis {axis!r} is not an axis of the mesh {mesh.axis_names}.')
  size = mesh.shape[axis]

  def leaf(x: Any) -> NamedSharding:
    shape = tuple(getattr(x, 'shape', ()))
    dims = [d for d in np.argsort(shape)[::-1] if shape[d] % size == 0 and shape[d] >= size]
    if not dims or size == 1:
      return replicated(mesh)
    spec = [None] * len(shape)
    spec[dims[0]] = axis
    return NamedSharding(mesh, P(*spec))

  return jax.tree.map(leaf, tree)


def put(tree: PyTree, shardings: PyTree) -> PyTree:
  """`tree`'s arrays as global arrays placed by `shardings` (a tree or one sharding).

  Every process must pass the same values (e.g. a model initialised from the same seed, or
  `to_host` copies); arrays already placed as asked are kept as they are.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)

  def leaf(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    host = to_host(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(leaf, tree, shardings)


def to_host(tree: PyTree) -> PyTree:
  """A numpy copy of every array of `tree`, whole, in every process.

  Arrays split across processes are gathered (a collective: every process must call it at
  the same point).
  """

  def leaf(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(leaf, tree)


def to_local(tree: PyTree) -> PyTree:
  """`to_host(tree)` on this process's first device: arrays that host code (surgery,
  evaluation of one process's own) can use as a single-device run uses its own."""
  return jax.device_put(to_host(tree), jax.local_devices()[0])


def global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """One global batch from the rows this process read (`data_shard`), split over `mesh`.

  Raises:
    ValueError: the rows cannot be split evenly over this process's devices.
  """
  sharding = batch_sharding(mesh)
  local = len(mesh.local_devices)
  for key, value in batch.items():
    if value.shape[0] % local:
      raise ValueError(f'batch[{key!r}] has {value.shape[0]} rows, which the {local} devices '
                       'of this process cannot share evenly.')
  if jax.process_count() == 1:  # The local rows are the global batch: one transfer.
    return jax.device_put(dict(batch), sharding)
  return {key: jax.make_array_from_process_local_data(sharding, value)
          for key, value in batch.items()}


def data_shard() -> grain.sharding.ShardOptions:
  """This process's share of every batch (grain's shard options: index and count)."""
  return grain.sharding.ShardByJaxProcess()


def check_divides(batch_size: int, mesh: Mesh) -> str | None:
  """Why a global batch of `batch_size` rows cannot be split over `mesh`, or None."""
  if batch_size % mesh.size:
    lower = batch_size - batch_size % mesh.size
    return (f'is not a multiple of the {mesh.size} devices the batch is split over (the '
            f'mesh {dict(mesh.shape)}); use a multiple, e.g. {lower or mesh.size} or '
            f'{lower + mesh.size}')
  return None
