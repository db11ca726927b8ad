"""The bandwidth/latency model of a ShardedRMSprop step and of the communication of a training
iteration, and its predictions for H100 clusters (``model.py`` describes it, measures its
inputs on this machine and checks it against the benchmarks' results).

- :class:`Machine` and :func:`step_time`: the model's terms for one step; :func:`cpu_machine`:
  the inputs measured here, at one world size; :func:`padded_numel`: the flat buffer's length.
- :class:`Cluster`, :func:`predictions`: the step on H100s; :data:`MODES`,
  :func:`training_iteration` and :func:`iteration_predictions`: the communication of whole
  training iterations that nothing hides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Bytes per element moved by one fused update with momentum and centered (float32):
#: param, grad, square_avg, momentum_buffer, grad_avg read; all but grad written.
UPDATE_BYTES = 36
#: Bytes per element of the gradient gather (read the gradient slice, write the grad window).
GATHER_BYTES = 8
#: The staging buffer of the owned gradients (sharded_rmsprop.shards.GRAD_WINDOW_NUMEL, fp32).
GRAD_WINDOW_BYTES = 4 * (1 << 22)
#: torch.optim.RMSprop's foreach op sequence with momentum and centered, per element (no grad
#: copy): mul_ 8, addcmul_ 12, lerp_ 12, addcmul 12, sqrt_ 8, add_ 8, mul_ 8, addcdiv_ 16,
#: add_ 12.
REPLICATED_BYTES = 96
ALIGN = 64  # the layout aligns each parameter's start to 64 elements (layout.ALIGNMENT)


# -- the model -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """The model's inputs for one world size (bandwidths in bytes/s, times in seconds)."""

    B_update: float
    B_copy: float
    h_step: float
    h_param: float
    L: float = 0.0
    B_bus: float = math.inf
    oversubscription: float = 1.0
    # Ranks of one host sharing the flat buffer (gloo): the sync is two barriers, no bytes.
    host_shared: bool = False
    L_barrier: float = 0.0


def padded_numel(numels: list[int], world: int) -> int:
    """The flat buffer's length by ShardedRMSprop's documented layout, for tensors of ``numels``
    elements: each start aligned to ALIGN elements, the end to ALIGN * N."""
    end = 0
    for numel in numels:
        end = (end + ALIGN - 1) // ALIGN * ALIGN + numel
    return (end + ALIGN * world - 1) // (ALIGN * world) * (ALIGN * world)


def step_time(
    m: Machine, padded: int, tensors: int, world: int, sync_bytes_per_elem: int = 4
) -> dict:
    """The model's terms and total, seconds."""
    shard = padded / world
    terms = dict(
        host=m.oversubscription * (m.h_step + tensors * m.h_param),
        gather=GATHER_BYTES * shard / m.B_copy,
        update=UPDATE_BYTES * shard / m.B_update,
        sync=(
            0.0
            if world == 1
            else 2 * m.L_barrier
            if m.host_shared
            else m.L + (world - 1) / world * sync_bytes_per_elem * padded / m.B_bus
        ),
    )
    terms["total"] = sum(terms.values())
    return terms


def cpu_machine(inputs: dict, world: int, host_shared: bool) -> Machine:
    one = inputs["per_world"]["1"]
    here = inputs["per_world"][str(world)]
    return Machine(
        B_update=here["B_update"],
        B_copy=here["B_copy"],
        h_step=one["h_step"],
        h_param=one["h_param"],
        L=here.get("L", 0.0),
        B_bus=here.get("B_bus", math.inf),
        oversubscription=max(1.0, world / inputs["cores"]),
        host_shared=host_shared and world > 1,  # ShardedRMSprop(host_shared=True)
        L_barrier=here.get("L_barrier", 0.0),
    )


# -- H100 predictions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """Assumed H100 figures (bytes/s, seconds); see the notes printed with the table."""

    hbm: float = (
        3.0e12  # streaming kernels: about 3 TB/s of an H100's HBM3 in a device-to-device copy
    )
    nvlink_busbw: float = 360e9  # NCCL all-gather busbw within an 8-GPU node
    network_busbw: float = 400e9 / 8  # 400 Gb/s per GPU between nodes
    gpus_per_node: int = 8
    hop_latency_nvlink: float = 2e-6  # per ring step
    hop_latency_network: float = 6e-6
    base_latency: float = 10e-6  # launch and the first step of a collective
    host_step: float = 150e-6  # the Python of one step on a GPU host (few large buckets)
    memory: float = 80e9
    # the iteration model (training_iteration): sustained matmul throughput in float32 with
    # TF32 (~40% of the 495 TFLOP/s peak), tokens per GPU per step, DDP's bucket size
    flops: float = 200e12
    tokens_per_gpu: int = 16 * 1024
    bucket_bytes: int = 25 * 2**20

    def machine(self, world: int) -> Machine:
        intra = world <= self.gpus_per_node
        hop = self.hop_latency_nvlink if intra else self.hop_latency_network
        return Machine(
            B_update=self.hbm,
            B_copy=self.hbm,
            h_step=self.host_step,
            h_param=0.0,
            L=self.base_latency + (world - 1) * hop,
            B_bus=self.nvlink_busbw if intra else self.network_busbw,
        )


def predictions(cluster: Cluster) -> list[str]:
    rows = []
    for billions in (1, 10):
        params = billions * 10**9
        for world in (8, 16, 32, 64, 128, 256, 512, 1024):
            m = cluster.machine(world)
            t = step_time(m, params, 0, world)
            bf16 = step_time(m, params, 0, world, sync_bytes_per_elem=2)
            replicated = REPLICATED_BYTES * params / cluster.hbm
            # hybrid: sharded within a node (node_local_group()), replicated across nodes
            node = min(world, cluster.gpus_per_node)
            hybrid = step_time(cluster.machine(node), params, 0, node)
            ours_mem = 3 * 4 * params / world + GRAD_WINDOW_BYTES  # 3 fp32 state buffers + window
            hybrid_mem = 3 * 4 * params / node + GRAD_WINDOW_BYTES
            total_mem = 4 * params * 2 + ours_mem  # + params and grads, fp32, unsharded
            rows.append(
                f"| {billions} B | {world} | {world // cluster.gpus_per_node} | "
                f"{t['update'] * 1e3 + t['gather'] * 1e3:.2f} | {t['sync'] * 1e3:.1f} | "
                f"{t['total'] * 1e3:.1f} | {bf16['total'] * 1e3:.1f} | "
                f"{hybrid['total'] * 1e3:.1f} | {replicated * 1e3:.1f} | "
                f"{ours_mem / 1e9:.2f} | {hybrid_mem / 1e9:.2f} | {12 * params / 1e9:.0f} | "
                f"{total_mem / 1e9:.1f}{'' if total_mem < cluster.memory else ' (> 80)'} |"
            )
    return rows


def _ring(m: Machine, world: int, numel: float, passes: int) -> float:
    """One ring collective over ``numel`` float32 elements: ``passes`` 1 for a reduce-scatter
    or an all-gather, 2 for an all-reduce."""
    return 0.0 if world == 1 else passes * (m.L + (world - 1) / world * 4 * numel / m.B_bus)


#: The training modes the iteration model compares: (gradient collective passes over every
#: GPU, whether the parameter sync follows the update, whether that sync hides behind the next
#: forward, whether the state is sharded within each node only).
MODES = {
    "DDP + replicated RMSprop": (2, False, False, False),
    "ours ZeRO-1 (DDP all-reduce + sync)": (2, True, False, False),
    "ours reduce-scatter": (1, True, False, False),
    "ours hybrid (node_local_group(), DDP all-reduce)": (2, True, False, True),
    "ours reduce-scatter + overlap_param_sync (sync behind the forward)": (1, True, True, False),
}


def training_iteration(cluster: Cluster, params: float, world: int, mode: str) -> dict:
    """Seconds of one training iteration's communication that nothing hides (``exposed``),
    of the update (``update``), and bytes sent per GPU (``bytes``), for ``mode`` of
    :data:`MODES`.

    The gradient collective runs bucket by bucket behind the backward (2x the forward's
    ``2 P tokens`` FLOPs): only the last bucket's, and whatever does not fit behind the
    backward, is exposed. The parameter sync runs after the update (exposed whole), or,
    behind the next forward, all but the first bucket's hide there."""
    grad_passes, syncs, behind_forward, node_local = MODES[mode]
    m = cluster.machine(world)
    shards = min(world, cluster.gpus_per_node) if node_local else world
    sharded = cluster.machine(shards)  # the links and ranks the state is sharded over
    bucket = cluster.bucket_bytes / 4
    forward = 2 * params * cluster.tokens_per_gpu / cluster.flops
    backward = 2 * forward
    grads = _ring(m, world, params, grad_passes)
    exposed = _ring(m, world, min(bucket, params), grad_passes) + max(0.0, grads - backward)
    terms = step_time(sharded, params, 0, shards)
    update = terms["update"] + terms["gather"] if syncs else REPLICATED_BYTES * params / cluster.hbm
    sync = _ring(sharded, shards, params, 1) if syncs else 0.0
    if behind_forward:
        exposed += _ring(m, world, min(bucket, params), 1) + max(0.0, sync - forward)
    else:
        exposed += sync
    moved = 4 * params * (
        (world - 1) / world * grad_passes + ((shards - 1) / shards if syncs else 0.0)
    )
    return {"exposed": exposed, "update": update, "bytes": moved, "backward": backward}


def iteration_predictions(cluster: Cluster) -> list[str]:
    rows = []
    for billions in (1, 10):
        params = billions * 10**9
        for world in (8, 16, 64, 256, 1024):
            ddp = training_iteration(cluster, params, world, "DDP + replicated RMSprop")
            for mode in MODES:
                t = training_iteration(cluster, params, world, mode)
                verdict = "yes" if t["exposed"] <= ddp["exposed"] * 1.001 else "no"
                rows.append(
                    f"| {billions} B | {world} | {mode} | {t['bytes'] / 1e9:.1f} | "
                    f"{t['exposed'] * 1e3:.1f} | {t['update'] * 1e3:.2f} | "
                    f"{(t['exposed'] + t['update']) * 1e3:.1f} | {verdict} |"
                )
    return rows
