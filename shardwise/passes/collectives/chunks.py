"""What each collective means, in chunks: who holds what before, who must hold what after.

``nbytes`` conventions (as the CLI and the plan use them): allgather — the gathered output; reduce_scatter —
the full input (every rank's); allreduce and broadcast — the buffer; alltoall — each rank's send buffer.

With ``p`` ranks and ``c`` chunks per rank, global chunks are numbered:

* allgather, reduce_scatter, allreduce: ``g = home * c + k`` (``home`` is the rank that contributes it
  (allgather) or keeps its reduced value (reduce_scatter); for allreduce it only names the chunk's place);
* alltoall: ``g = (src * p + dst) * c + k`` (the k-th piece that ``src`` sends to ``dst``);
* broadcast: ``g = k`` (held by the root).

A chunk's value is symbolic: the frozenset of ranks whose contribution it holds. Copy collectives move
values unchanged; reductions merge disjoint sets (every contribution exactly once).
"""

from __future__ import annotations

from dataclasses import dataclass

from shardwise.errors import UserInputError

__all__ = ["COLLECTIVES", "REDUCING", "CollectiveSpec", "check_collective"]

COLLECTIVES = ("allgather", "reduce_scatter", "allreduce", "alltoall", "broadcast")
REDUCING = frozenset({"reduce_scatter", "allreduce"})

_ALIASES = {
    "all_gather": "allgather",
    "all-gather": "allgather",
    "reducescatter": "reduce_scatter",
    "reduce-scatter": "reduce_scatter",
    "all_reduce": "allreduce",
    "all-reduce": "allreduce",
    "all_to_all": "alltoall",
    "all-to-all": "alltoall",
}


def check_collective(name: str) -> str:
    """The canonical collective name; UserInputError naming the accepted ones otherwise."""
    key = _ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in COLLECTIVES:
        raise UserInputError(f"unknown collective {name!r}: use one of {', '.join(COLLECTIVES)}")
    return key


@dataclass(frozen=True)
class CollectiveSpec:
    """A collective over ``nranks`` ranks with ``chunks`` chunks per rank (``root`` for broadcast)."""

    kind: str
    nranks: int
    chunks: int = 1
    root: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", check_collective(self.kind))
        if self.nranks < 1 or self.chunks < 1 or not 0 <= self.root < self.nranks:
            raise UserInputError(
                f"collective {self.kind}: nranks={self.nranks}, chunks={self.chunks}, root={self.root} "
                "is not allowed (need nranks >= 1, chunks >= 1, 0 <= root < nranks)"
            )

    @property
    def reduces(self) -> bool:
        return self.kind in REDUCING

    @property
    def nchunks(self) -> int:
        p, c = self.nranks, self.chunks
        if self.kind == "alltoall":
            return p * p * c
        if self.kind == "broadcast":
            return c
        return p * c

    def chunk_bytes(self, nbytes: float) -> float:
        """Bytes of one chunk for a collective of ``nbytes`` (see the module docstring)."""
        if self.kind == "alltoall":
            return nbytes / (self.nranks * self.chunks)
        return nbytes / self.nchunks

    @property
    def in_chunks(self) -> int:
        """Chunks in each rank's input buffer."""
        return {"allgather": 1, "broadcast": 1}.get(self.kind, self.nranks) * self.chunks

    @property
    def out_chunks(self) -> int:
        """Chunks in each rank's output buffer."""
        return {"reduce_scatter": 1, "broadcast": 1}.get(self.kind, self.nranks) * self.chunks

    def home(self, g: int) -> int:
        """The rank a chunk is attached to (source, destination or place; the root for broadcast)."""
        if self.kind == "broadcast":
            return self.root
        if self.kind == "alltoall":
            return g // (self.nranks * self.chunks)
        return g // self.chunks

    def a2a_dst(self, g: int) -> int:
        return (g // self.chunks) % self.nranks

    def input_map(self, rank: int) -> list[tuple[int, int]]:
        """(input buffer chunk index, global chunk) pairs that ``rank`` starts with."""
        p, c = self.nranks, self.chunks
        if self.kind == "allgather":
            return [(k, rank * c + k) for k in range(c)]
        if self.kind == "broadcast":
            return [(k, k) for k in range(c)] if rank == self.root else []
        if self.kind == "alltoall":
            return [(d * c + k, (rank * p + d) * c + k) for d in range(p) for k in range(c)]
        return [(g, g) for g in range(p * c)]

    def output_map(self, rank: int) -> list[tuple[int, int]]:
        """(global chunk, output buffer chunk index) pairs that ``rank`` must end with."""
        p, c = self.nranks, self.chunks
        if self.kind == "reduce_scatter":
            return [(rank * c + k, k) for k in range(c)]
        if self.kind == "broadcast":
            return [(k, k) for k in range(c)]
        if self.kind == "alltoall":
            return [((s * p + rank) * c + k, s * c + k) for s in range(p) for k in range(c)]
        return [(g, g) for g in range(p * c)]

    def initial(self, rank: int) -> dict[int, frozenset[int]]:
        """Global chunk -> symbolic value that ``rank`` holds at the start."""
        return {g: frozenset((rank,)) for _, g in self.input_map(rank)}

    def required(self, rank: int) -> dict[int, frozenset[int]]:
        """Global chunk -> symbolic value that ``rank`` must hold at the end."""
        everyone = frozenset(range(self.nranks))
        out: dict[int, frozenset[int]] = {}
        for g, _ in self.output_map(rank):
            out[g] = everyone if self.reduces else frozenset((self.home(g),))
        return out

    def map_chunk(self, ranks_perm: tuple[int, ...], g: int) -> int:
        """The image of chunk g under a permutation of ranks (chunks follow the ranks they are attached to).

        Broadcast chunks are attached to the root: only permutations fixing it are symmetries.
        """
        c = self.chunks
        if self.kind == "broadcast":
            return g
        if self.kind == "alltoall":
            p = self.nranks
            s, d, k = g // (p * c), (g // c) % p, g % c
            return (ranks_perm[s] * p + ranks_perm[d]) * c + k
        return ranks_perm[g // c] * c + g % c
