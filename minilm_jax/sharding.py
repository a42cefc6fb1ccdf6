"""Device mesh and partition rules.

One mesh with axes ("data", "fsdp"). The batch is split over both axes. Parameters (and the optimizer
state that mirrors them) are replicated, or with fsdp > 1 each large tensor is split over "fsdp" along its
largest divisible dimension (big_vision's rule). Inside the step the loss sees them gathered
(`gathered`): XLA all-gathers each weight where it is used and reduce-scatters its gradient, and the
batch stays split. Left to itself, the compiler's propagation had instead gathered the activations
([B, T, 4H] at a time) onto the weights' shards.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
_MIN_FSDP_SIZE = 2 ** 14  # Smaller tensors (biases, LayerNorms) are cheaper replicated.


def make_mesh(fsdp: int = 1, devices: Optional[Sequence[Any]] = None) -> jax.sharding.Mesh:
  """A ("data", "fsdp") mesh over all devices (of every host), data = devices / fsdp."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"parallel.fsdp={fsdp} does not divide the {n} devices")
  # Auto axes: the compiler propagates shardings through the model; we only pin inputs and state.
  return jax.make_mesh((n // fsdp, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)


def check_batch(mesh: jax.sharding.Mesh, global_batch: int, grad_accum: int = 1) -> None:
  """A clear error, before compiling, when a (micro)batch does not split evenly over the devices."""
  n = mesh.devices.size
  if global_batch % grad_accum:
    raise ValueError(f"batch_size {global_batch} is not divisible by grad_accum {grad_accum}")
  micro = global_batch // grad_accum
  if micro % n:
    raise ValueError(f"batch_size {global_batch} (micro-batch {micro}) does not divide over the {n} "
                     f"devices; use a multiple of {n * grad_accum}")


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], fsdp: int) -> P:
  """Shard the largest dimension that `fsdp` divides; replicate small or indivisible tensors."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < _MIN_FSDP_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(mesh: jax.sharding.Mesh, abstract_tree: Any) -> Any:
  """NamedShardings for a tree of arrays / ShapeDtypeStructs under the fsdp rule of this mesh."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp)), abstract_tree)


def gathered(mesh: jax.sharding.Mesh, tree: Any) -> Any:
  """`tree` constrained to be whole on every device: with fsdp-sharded leaves, their all-gather (and,
  in the backward pass, the reduce-scatter of their gradients); nothing without fsdp."""
  if mesh.shape["fsdp"] == 1:
    return tree
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, replicated(mesh)), tree)


def split(mesh: jax.sharding.Mesh, tree: Any) -> Any:
  """`tree` constrained to its fsdp shardings (tree_shardings): for the gradients, which XLA then
  reduce-scatters rather than all-reducing whole and slicing; nothing without fsdp."""
  if mesh.shape["fsdp"] == 1:
    return tree
  return jax.lax.with_sharding_constraint(tree, tree_shardings(mesh, tree))


def per_device(mesh: jax.sharding.Mesh, f):
  """f run on each device's own rows of arguments and result split over the batch (dim 0 of each):
  jax.shard_map, for kernels that XLA cannot partition (Pallas's)."""
  spec = P(BATCH_AXES)
  return jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)


def put_batch(mesh: jax.sharding.Mesh, local_batch: dict) -> dict:
  """This host's rows -> global arrays sharded over the batch axes (multi-host safe)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def hosts():
  """The hosts of a multi-host run as shards.Hosts (a barrier and an all-gather over jax.distributed),
  for splitting the tokenisation; None on one host."""
  if not jax.distributed.is_initialized() or jax.process_count() == 1:
    return None  # without touching the devices: minilm-prepare on one host needs none
  from jax.experimental import multihost_utils
  from minilm_jax import shards
  gather = lambda x: [int(v) for v in multihost_utils.process_allgather(np.int32(x))]
  return shards.Hosts(jax.process_index(), jax.process_count(), multihost_utils.sync_global_devices,
                      gather)
