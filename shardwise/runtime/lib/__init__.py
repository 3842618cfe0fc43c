"""The runtime library of generated programs: what a program calls to communicate, reduce gradients, step
its optimizer, run a pipeline schedule and move its weights.

It imports torch and its own modules only (relative imports), so that codegen copies it verbatim into every
package it writes (as ``_runtime/``, imported by the program as ``C``) and the package needs torch alone.

* ``mesh`` — this rank's view of the device mesh, the pieces tensors are cut into;
* ``comm`` — collectives on plain tensors over one mesh axis (``schedule_exec`` runs synthesized ones);
* ``collectives`` — the autograd-aware redistributions a program runs between ops;
* ``attention`` — attention over a sequence split across an axis (Ulysses all-to-all, ring attention);
* ``gradients`` — the one gradient-reduction path (buckets summed while the backward runs; ZeRO slices);
* ``optim`` — ZeRO's sharded optimizer, host offload, fp16 loss scaling;
* ``training`` — the training step that uses them;
* ``pipeline`` — the schedule runtime of pipeline packages;
* ``weights`` — a program's pieces from whole weights and back (checkpoint helpers);
* ``moe`` — the routed experts of a mixture-of-experts layer, whole or expert parallel (all-to-all).
"""

from __future__ import annotations

from .attention import context_attention
from .collectives import (
    all_gather,
    all_reduce,
    all_to_all,
    grad_all_reduce,
    reduce_scatter,
    shard,
    sharded_cross_entropy,
    to_partial,
)
from .gradients import BUCKET_BYTES, Bucket, GradientReducer, make_buckets
from .mesh import Mesh, local_piece, piece_index, piece_size, piece_sizes
from .moe import all_to_all_rows, moe_experts
from .optim import HostOptimizer, LossScale, ShardedOptimizer
from .training import Trainer
from .weights import full_state_dict, load_full_state_dict, load_weights, whole

__all__ = [
    "BUCKET_BYTES",
    "Bucket",
    "GradientReducer",
    "HostOptimizer",
    "LossScale",
    "Mesh",
    "ShardedOptimizer",
    "Trainer",
    "all_gather",
    "all_reduce",
    "all_to_all",
    "all_to_all_rows",
    "context_attention",
    "full_state_dict",
    "grad_all_reduce",
    "load_full_state_dict",
    "load_weights",
    "local_piece",
    "make_buckets",
    "moe_experts",
    "piece_index",
    "piece_size",
    "piece_sizes",
    "reduce_scatter",
    "shard",
    "sharded_cross_entropy",
    "to_partial",
    "whole",
]
