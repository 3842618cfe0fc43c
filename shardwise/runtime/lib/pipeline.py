"""The schedule runtime of pipeline packages: one process per (device stage p, data-parallel replica d,
context-parallel index c, tensor-parallel index t), global rank ``((p * DP + d) * CP + c) * TP + t`` (``CP = 1``
without context parallelism).

A pipeline package's ``_pipeline.py`` holds the plan as constants (``PP``, ``DP``, ``TP``, ``CHUNKS``,
``MICROBATCHES``, ``MICROBATCH_SIZE``, ``RECOMPUTE``, ``TRAINING``, ``ZERO_STAGE``, ``GRAPH_INPUTS``,
``BATCH_INPUTS``, ``CHUNK_INPUTS``, ``CHUNK_OUTPUTS``, ``TRANSFERS``, ``TIED``, ``ACTIONS``,
``FORWARD_ACTIONS``: see that file) and subclasses ``PipelineRuntime`` with itself as ``spec``. Device
stage p holds the model chunks p, p + PP, ...; chunk c is the package's ``chunk{c}/``, a complete program
of its own, built on the TP ranks of its stage.

``train_step(*inputs)`` takes the whole batch; replica d keeps its rows, cuts them into ``MICROBATCHES``
micro-batches and runs ``ACTIONS[p]`` in order: ``("F", c, i)`` is chunk c's forward on micro-batch i
(inputs received from earlier chunks, outputs sent on), ``("B", c, i)`` its backward (output gradients
received from later chunks, input gradients sent back). Sends never block (isend) and receives do; the order
is deadlock-free (the planner's simulator ran it).

Expert parallelism (``EP > 1``, a divisor of ``DP``): the replicas ``o * EP .. o * EP + EP - 1`` of a stage share
its experts, each holding ``1 / EP`` of them; a chunk whose plan has an ``ep`` axis is built on those replicas'
ranks (its mesh ``EP x TP``), and its experts ops exchange rows over that axis. The whole mesh is ``PP x DP x
TP`` when ``EP == DP``, else ``PP x DP/EP x EP x TP`` (axes ``pp dp ep tp``). An expert's gradient is complete
within its group: it is reduced over the ``DP / EP`` replicas of the group only (``dp``), the other gradients
over every replica (``ep`` first, then ``dp``, ZeRO's axis).

Context parallelism (``CP > 1``): every chunk is built on its replica's ``CP x TP`` ranks (its mesh ``cp x tp``);
each rank of them runs the replica's micro-batches, cuts its piece of the sequence of every value it receives
(whole), makes its outputs whole again, and sends them to the rank of the same index on the next stage. The
whole mesh is ``PP x DP x CP x TP``; gradients are summed over the chunk's own axes (``cp``, ``tp``) and over
the replicas.

Gradients take the path of every program (``training.Trainer``): each micro-batch's loss is scaled by its
weight in the step's loss (the mean over the batch: ``1 / (MICROBATCHES * DP)``), every rank's gradients
are partial sums of the step's gradient, summed over tensor parallelism (each chunk's ``GRAD_REDUCE``) and
over the data-parallel replicas while the last backward of each chunk runs; then the copies of tied weights
are summed over the stages holding them, and the optimizer steps (ZeRO stage ``ZERO_STAGE`` over the
replicas; tied weights are not sharded). The step's loss is the mean of the micro-batches' losses.
"""

from __future__ import annotations

import importlib

import torch
import torch.distributed as dist

from .mesh import Mesh, local_piece
from .training import Trainer
from .weights import whole

__all__ = ["PipelineRuntime", "join_outputs"]


class PipelineRuntime:
    """This rank's chunks, the process groups and the schedule loop of the pipeline ``spec`` describes."""

    def __init__(self, spec, rank: int, world_size: int, device: torch.device | str = "cpu") -> None:
        s = self.spec = spec
        if world_size != s.WORLD_SIZE:
            raise ValueError(f"this pipeline was planned for {s.WORLD_SIZE} processes, not {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.cp = getattr(s, "CP", 1)
        self.inner = self.cp * s.TP  # the ranks of one replica on one stage: cp x tp
        self.p, rest = divmod(rank, s.DP * self.inner)
        self.d, self.g = divmod(rest, self.inner)  # g: the index inside the replica's cp x tp ranks
        self.c, self.t = divmod(self.g, s.TP)
        self.distributed = dist.is_available() and dist.is_initialized() and world_size > 1
        self.ep = getattr(s, "EP", 1)
        # every rank makes every group in the same order: the mesh's lines, then the tied weights' stages
        if self.cp > 1:
            shape, axes = (s.PP, s.DP, self.cp, s.TP), ("pp", "dp", "cp", "tp")
        elif 1 < self.ep < s.DP:
            shape, axes = (s.PP, s.DP // self.ep, self.ep, s.TP), ("pp", "dp", "ep", "tp")
        else:
            shape, axes = (s.PP, s.DP, s.TP), ("pp", "dp", "tp")
        self.mesh = Mesh(rank, shape, axes, tuple(range(world_size)))
        self.groups: dict[tuple[int, ...], object] = {
            self.mesh.group_ranks[a]: self.mesh.groups[a] for a in self.mesh.groups
        }
        for _, chunks in s.TIED:
            stages = sorted({c % s.PP for c in chunks})
            for d in range(s.DP):
                for g in range(self.inner):
                    members = tuple(self.rank_of(p, d, g) for p in stages)
                    if len(members) > 1 and len(members) < s.PP:  # all stages: the mesh's pp line
                        group = dist.new_group(list(members)) if self.distributed else None
                        self.groups.setdefault(members, group)
        self.chunks: dict[int, tuple[object, torch.nn.Module]] = {}
        for c in range(self.p, s.CHUNKS, s.PP):
            self.chunks[c] = self._build_chunk(c)
        self.trainer: Trainer | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending: list[tuple[object, torch.Tensor]] = []
        # the last backward of each chunk completes its gradients: their reduction starts with it
        self._last_backward = {}
        for k, (kind, c, _) in enumerate(s.ACTIONS[self.p] if s.TRAINING else ()):
            if kind == "B":
                self._last_backward[c] = k

    def rank_of(self, p: int, d: int, g: int) -> int:
        """The global rank of stage ``p``, replica ``d``, index ``g = c * TP + t`` among its cp x tp ranks."""
        return (p * self.spec.DP + d) * self.inner + g

    def _tag(self, transfer: int, microbatch: int, backward: bool) -> int:
        return (transfer * self.spec.MICROBATCHES + microbatch) * 2 + int(backward)

    def _chunk_replicas(self, module) -> int:
        """How many replicas chunk ``module``'s mesh spans: ``EP`` on an ``ep x tp`` mesh, else 1."""
        return module.MESH_SHAPE[0] if module.MESH_AXES[0] == "ep" else 1

    def _build_chunk(self, c: int) -> tuple[object, torch.nn.Module]:
        """Chunk c's program on this rank's tensor-parallel group, or with expert parallelism on the ranks of
        its ep group of replicas (its mesh takes the groups made above: lines of the whole mesh; the lines this
        rank is not on are None, as a mesh keeps only its own)."""
        module = importlib.import_module(f"{self.spec.__package__}.chunk{c}.program")
        ways = self._chunk_replicas(module)
        first = self.d - self.d % ways
        module.MESH_RANKS = tuple(
            self.rank_of(self.p, first + e, g) for e in range(ways) for g in range(self.inner)
        )
        real = dist.new_group

        def made(ranks=None, *args, **kwargs):
            members = tuple(ranks)
            if members not in self.groups and self.rank in members:
                raise RuntimeError(f"chunk {c} asks for a process group {members} the pipeline did not make")
            return self.groups.get(members)

        dist.new_group = made
        try:
            program = module.Program(self.rank, self.world_size, self.device)
        finally:
            dist.new_group = real
        return module, program

    # -- weights -----------------------------------------------------------------------------------------

    def load_weights(self, path: str) -> None:
        for _, program in self.chunks.values():
            program.load_weights(path)

    def load_full_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        for _, program in self.chunks.values():
            program.load_full_state_dict(state_dict)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, whole, on rank 0 (the other ranks return an empty dict)."""
        out: dict[str, torch.Tensor] = {}
        for c in sorted(self.chunks):
            module, program = self.chunks[c]
            if self.d < self._chunk_replicas(module):  # the first group of replicas gathers (over ep, tp)
                gathered_chunk = program.full_state_dict()
                if self.d == 0:
                    out.update(gathered_chunk)
        if not self.distributed:
            return out
        gathered = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(out if self.g == 0 and self.d == 0 else {}, gathered, dst=0)
        if self.rank != 0:
            return {}
        merged: dict[str, torch.Tensor] = {}
        for part in gathered:
            for key, value in (part or {}).items():
                merged.setdefault(key, value)
        return merged

    # -- the schedule ------------------------------------------------------------------------------------

    def _microbatches(self, inputs: tuple) -> list[dict[str, object]]:
        s = self.spec
        if len(inputs) != len(s.GRAPH_INPUTS):
            raise ValueError(
                f"the model takes {len(s.GRAPH_INPUTS)} inputs ({', '.join(s.GRAPH_INPUTS)}), "
                f"got {len(inputs)}"
            )
        rows = s.MICROBATCH_SIZE * s.MICROBATCHES
        out = []
        for i in range(s.MICROBATCHES):
            mb = {}
            for k, (name, x) in enumerate(zip(s.GRAPH_INPUTS, inputs)):
                if k in s.BATCH_INPUTS and isinstance(x, torch.Tensor):
                    if x.shape[0] != rows * s.DP:
                        raise ValueError(
                            f"input {name} has {x.shape[0]} rows; this pipeline takes {rows * s.DP}"
                        )
                    start = self.d * rows + i * s.MICROBATCH_SIZE
                    x = x[start : start + s.MICROBATCH_SIZE]
                mb[name] = x.to(self.device) if isinstance(x, torch.Tensor) else x
            out.append(mb)
        return out

    def _send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        tensor = tensor.detach().contiguous()
        self._pending.append((dist.isend(tensor, dst, tag=tag), tensor))

    def _recv(self, shape, dtype: str, src: int, tag: int) -> torch.Tensor:
        buf = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
        dist.recv(buf, src, tag=tag)
        return buf

    def _inputs(self, c: int, i: int, mb: dict[str, object], backward_needed: bool) -> list:
        s = self.spec
        args = []
        for name in s.CHUNK_INPUTS[c]:
            if name in mb:
                args.append(mb[name])
                continue
            k, (_, src, _, shape, dtype, grad) = next(
                (k, t) for k, t in enumerate(s.TRANSFERS) if t[0] == name and t[2] == c
            )
            x = self._recv(shape, dtype, self.rank_of(src % s.PP, self.d, self.g), self._tag(k, i, False))
            args.append(x.requires_grad_(grad and backward_needed))
        return args

    def _forward(self, c: int, i: int, mb: dict[str, object], saved: dict, train: bool) -> tuple:
        s = self.spec
        _, program = self.chunks[c]
        args = self._inputs(c, i, mb, train)
        keep_graph = train and s.RECOMPUTE != "full"
        with torch.set_grad_enabled(keep_graph):
            out = program(*args)
        outs = out if isinstance(out, tuple) else (out,)
        for k, (name, src, dst, _, dtype, _) in enumerate(s.TRANSFERS):
            if src == c:
                value = outs[s.CHUNK_OUTPUTS[c].index(name)]
                dst_rank = self.rank_of(dst % s.PP, self.d, self.g)
                self._send(value.to(getattr(torch, dtype)), dst_rank, self._tag(k, i, False))
        if train:
            saved[(c, i)] = (args, outs if keep_graph else None)
        return outs

    def _backward(self, c: int, i: int, saved: dict) -> None:
        s = self.spec
        _, program = self.chunks[c]
        args, outs = saved.pop((c, i))
        if outs is None:  # full recomputation: run the forward again, this time keeping the graph
            args = [
                a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args
            ]
            out = program(*args)
            outs = out if isinstance(out, tuple) else (out,)
        if c == s.CHUNKS - 1:
            loss = outs[0][0] if isinstance(outs[0], tuple) else outs[0]
            if loss.dtype in (torch.bfloat16, torch.float16):
                loss = loss.float()
            (loss / (s.MICROBATCHES * s.DP)).backward()  # this micro-batch's share of the step's loss
        else:
            grads: dict[str, torch.Tensor] = {}
            for k, (name, src, dst, shape, dtype, grad) in enumerate(s.TRANSFERS):
                if src == c and grad:
                    g = self._recv(
                        shape, dtype, self.rank_of(dst % s.PP, self.d, self.g), self._tag(k, i, True)
                    )
                    grads[name] = grads[name] + g if name in grads else g
            tensors, grad_tensors = [], []
            for name, g in grads.items():
                value = outs[s.CHUNK_OUTPUTS[c].index(name)]
                if value.requires_grad:
                    tensors.append(value)
                    grad_tensors.append(g.to(value.dtype))
            if tensors:
                torch.autograd.backward(tensors, grad_tensors)
        for k, (name, src, dst, _, dtype, grad) in enumerate(s.TRANSFERS):
            if dst == c and grad:
                x = args[s.CHUNK_INPUTS[c].index(name)]
                g = x.grad if x.grad is not None else torch.zeros_like(x)
                self._send(
                    g.to(getattr(torch, dtype)),
                    self.rank_of(src % s.PP, self.d, self.g),
                    self._tag(k, i, True),
                )

    def _wait_sends(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    # -- training ----------------------------------------------------------------------------------------

    def parameters(self) -> list[torch.nn.Parameter]:
        seen: dict[int, torch.nn.Parameter] = {}
        for _, program in self.chunks.values():
            for p in program.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def _chunk_params(self, c: int) -> list[tuple[torch.nn.Parameter, tuple[str, ...]]]:
        """Chunk c's parameters, each with the axes its gradient is summed over: the chunk's own tensor-
        parallel axes (``GRAD_REDUCE``), and the data-parallel replicas (an expert's: those of its ep group)."""
        module, program = self.chunks[c]
        if 1 < self.ep < self.spec.DP:
            dense, experts = ("ep", "dp"), ("dp",)
        else:
            dense, experts = ("dp",) if self.spec.DP > 1 else (), ()
        split = {id(getattr(program, attr)) for attr, *_, placements in module.TENSORS.values()
                 if any(axis == "ep" for axis, _ in placements)}  # fmt: skip
        reduced = {}
        for key, axes in module.GRAD_REDUCE.items():
            p = getattr(program, module.TENSORS[key][0])
            own = tuple(a for a in axes if a not in ("dp", "ep") and program.mesh.size(a) > 1)
            reduced[id(p)] = (p, own + (experts if id(p) in split else dense))
        return [reduced.get(id(p), (p, experts if id(p) in split else dense)) for p in program.parameters()]

    def _tied_params(self) -> list[torch.nn.Parameter]:
        out = []
        for key, chunks in self.spec.TIED:
            for c in chunks:
                if c in self.chunks:
                    module, program = self.chunks[c]
                    out.append(getattr(program, module.TENSORS[key][0]))
        return out

    def configure_optimizer(self, factory=None) -> None:
        """``factory(parameters) -> torch.optim.Optimizer`` over this rank's chunks (AdamW when none is
        given), run by the trainer (``training.Trainer``)."""
        params = [pair for c in sorted(self.chunks) for pair in self._chunk_params(c)]
        self.trainer = Trainer(
            params,
            self.mesh,
            factory or torch.optim.AdamW,
            zero_stage=self.spec.ZERO_STAGE,
            whole=self._tied_params(),
        )
        self.optimizer = self.trainer.optimizer

    def train_step(self, *inputs) -> torch.Tensor:
        """One optimizer step on this batch; returns the step's loss (the same on every rank)."""
        s = self.spec
        if not s.TRAINING:
            raise RuntimeError("this pipeline was planned for inference: plan it with mode='train' to train")
        if self.trainer is None:
            self.configure_optimizer()
        mbs = self._microbatches(inputs)
        saved: dict = {}
        losses = []
        for k, (kind, c, i) in enumerate(s.ACTIONS[self.p]):
            if kind == "F":
                outs = self._forward(c, i, mbs[i], saved, True)
                if c == s.CHUNKS - 1:
                    loss = outs[0][0] if isinstance(outs[0], tuple) else outs[0]
                    losses.append(loss.detach().double())  # summed in float64: exact for every dtype
            else:
                if self._last_backward[c] == k:
                    self.trainer.arm([p for p, _ in self._chunk_params(c)])
                self._backward(c, i, saved)
        self._wait_sends()
        self.trainer.reduce()
        self._sum_tied_copies()
        self.trainer.step()
        total = torch.stack(losses).sum() if losses and self.g == 0 else torch.zeros((), dtype=torch.float64)
        total = total / (s.MICROBATCHES * s.DP)
        if self.distributed:
            dist.all_reduce(total)
        return total

    def _sum_tied_copies(self) -> None:
        """The gradient of a tied weight is the sum of its copies' (each already reduced over tp and dp)."""
        for key, chunks in self.spec.TIED:
            mine = [c for c in chunks if c in self.chunks]
            if not mine:
                continue
            pieces = []
            for c in mine:
                module, program = self.chunks[c]
                attr, shape, _, _, placements = module.TENSORS[key]
                param = getattr(program, attr)
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                pieces.append((program, param, placements, shape))
            total = sum(whole(p.grad, pl, prog.mesh, shape) for prog, p, pl, shape in pieces)
            members = tuple(
                self.rank_of(st, self.d, self.g) for st in sorted({c % self.spec.PP for c in chunks})
            )
            if len(members) > 1 and self.distributed:
                dist.all_reduce(total, group=self.groups[members])
            for program, param, placements, _ in pieces:
                param.grad.copy_(local_piece(total, placements, program.mesh))

    # -- inference ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def infer(self, *inputs):
        """The forward pass on the whole batch; rank 0 returns the outputs (the other ranks None)."""
        s = self.spec
        mbs = self._microbatches(inputs)
        results: list[tuple] = []
        for _, c, i in s.FORWARD_ACTIONS[self.p]:
            outs = self._forward(c, i, mbs[i], {}, False)
            if c == s.CHUNKS - 1:
                results.append(outs)
        self._wait_sends()
        mine = join_outputs(results) if results and self.g == 0 else None
        if not self.distributed:
            return _unpack(mine)
        gathered = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if self.rank != 0:
            return None
        replicas = [gathered[self.rank_of(s.PP - 1, d, 0)] for d in range(s.DP)]
        return _unpack(join_outputs(replicas))

    def __call__(self, *inputs):
        return self.infer(*inputs)


def join_outputs(parts: list[tuple]) -> tuple:
    """Micro-batch (or replica) outputs joined: batch-sized tensors concatenated, scalars averaged."""
    out = []
    for values in zip(*parts):
        first = values[0]
        if isinstance(first, torch.Tensor) and first.dim() > 0:
            out.append(torch.cat([v.detach() for v in values]))
        elif isinstance(first, torch.Tensor):
            wide = torch.float64 if first.dtype == torch.float64 else torch.float32
            out.append(torch.stack([v.detach().to(wide) for v in values]).mean().to(first.dtype))
        else:
            out.append(first)
    return tuple(out)


def _unpack(outs: tuple | None):
    if outs is None:
        return None
    return outs[0] if len(outs) == 1 else outs
