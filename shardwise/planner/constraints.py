"""The one constraint parser: what a user may pin, with the same names in the API and on the CLI.

``parse_constraints(mapping, cluster)`` turns ``{"pp": 4, "zero": 3, "recompute": "selective"}`` (the API's
``constraints=``) or the CLI's ``-C pp=4 -C zero=3 -C recompute=selective`` (strings, see :func:`from_cli`)
into a :class:`Constraints`; anything not pinned is searched. Keys:

* degrees: ``pp``, ``dp``, ``tp`` (positive integers; their product may not exceed the cluster);
* ``sp``: sequence parallelism on the tensor-parallel axis: ``1`` (or ``0``) off, ``tp``'s value on;
* ``zero``: ZeRO stage 0 (none), 1 (optimizer state sharded over dp), 2 (and gradients), 3 (and parameters:
  FSDP);
* micro-batching and schedule (pipelines): ``microbatches`` or ``microbatch_size``, ``virtual`` (chunks per
  device; > 1 means interleaved), ``schedule`` (``gpipe``, ``1f1b``, ``interleaved``);
* ``recompute``: ``none``, ``selective`` (the fewest layers that make the plan fit), ``full`` (every layer),
  ``auto`` (searched: the default); ``0``/``1`` and ``all`` are accepted for ``none``/``full``;
* ``offload``: ``none``, ``optimizer``, ``activations``, ``optimizer+activations`` (host memory), ``auto``;
* ``collectives``: ``library`` (NCCL/Gloo's own algorithms) or ``synthesize`` (topology-aware schedules where
  predicted faster);
* ``ep``: expert parallelism, the experts of every mixture-of-experts layer split over ``ep`` of the
  data-parallel ranks (tokens dispatched to their experts by all-to-all), replicated over ``dp / ep`` groups;
  a divisor of the expert count and of ``dp``, flat plans and pipelines (each stage's experts split over ``ep``
  of its data-parallel replicas) (``1``: every rank holds every expert);
* ``cp``: context parallelism, the sequence (token) dimension split over an axis of its own (flat plans and each
  pipeline stage's replicas; not with ``ep`` in pipelines);
  ``cp_attention``: how attention runs over the split sequence: ``allgather`` (keys and values gathered),
  ``ulysses`` (all-to-all to a head split and back), ``ring`` (key/value blocks passed around the ring) or
  ``auto`` (the cheapest by the price list: the default).

Errors name the key, the value and what is allowed (``ConstraintError``, a ``PlanError`` and a ``UserInputError``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from shardwise.cluster import ClusterSpec
from shardwise.costs.attention import CP_WAYS
from shardwise.errors import ConstraintError, UserInputError
from shardwise.ir.pipeline import SCHEDULES

__all__ = [
    "Constraints", "parse_constraints", "from_cli", "CONSTRAINT_KEYS", "RECOMPUTE_MODES", "OFFLOAD_MODES",
    "COLLECTIVE_MODES",
]  # fmt: skip

RECOMPUTE_MODES = ("none", "selective", "full", "auto")
OFFLOAD_MODES = ("none", "auto", "optimizer", "activations", "optimizer+activations")
COLLECTIVE_MODES = ("library", "synthesize")
_INTS = ("pp", "dp", "tp", "microbatches", "microbatch_size", "virtual", "ep", "cp")
CONSTRAINT_KEYS = (*_INTS, "sp", "zero", "schedule", "recompute", "offload", "collectives", "cp_attention")
_RECOMPUTE_ALIASES = {"0": "none", "1": "full", "all": "full", "off": "none"}


@dataclass(frozen=True)
class Constraints:
    """What the user pinned (None: searched)."""

    pp: int | None = None
    dp: int | None = None
    tp: int | None = None
    sp: bool | None = None
    zero: int | None = None
    microbatches: int | None = None
    microbatch_size: int | None = None
    virtual: int | None = None
    schedule: str | None = None
    recompute: str | None = None
    recompute_budget: int | None = None  # bytes per rank (the API's recompute=<int>)
    offload: str | None = None
    collectives: str | None = None
    ep: int | None = None
    cp: int | None = None  # context parallelism (the sequence split over its own axis)
    cp_attention: str | None = None  # one of costs.attention.CP_WAYS (None: chosen by price)

    def pinned(self) -> dict[str, object]:
        """The pinned choices, for notes and errors."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def replace(self, **changes: object) -> Constraints:
        import dataclasses

        return dataclasses.replace(self, **changes)


def from_cli(items: list[str] | None) -> dict[str, object]:
    """``["pp=4", "recompute=selective,zero=1"]`` -> ``{"pp": 4, "recompute": "selective", "zero": 1}``."""
    out: dict[str, object] = {}
    for item in items or []:
        for part in filter(None, item.split(",")):
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key or not value:
                raise UserInputError(
                    f"--constraint {part!r}: write it as KEY=VALUE, e.g. pp=2, zero=3, recompute=selective "
                    f"(keys: {', '.join(CONSTRAINT_KEYS)})"
                )
            out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def _int(key: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConstraintError(f"constraint {key}={value!r}: must be an integer >= {minimum}")
    return value


def _choice(key: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ConstraintError(f"constraint {key}={value!r}: choose one of {', '.join(allowed)}")
    return value


def parse_constraints(raw: Mapping[str, object] | None, cluster: ClusterSpec) -> Constraints:
    """Validate ``raw`` (see the module docstring) against ``cluster``."""
    values: dict[str, object] = {}
    for key, value in (raw or {}).items():
        if key not in CONSTRAINT_KEYS:
            raise ConstraintError(f"unknown constraint {key!r}: allowed are {', '.join(CONSTRAINT_KEYS)}")
        if key in _INTS:
            values[key] = _int(key, value, 1)
        elif key == "zero":
            values[key] = _int(key, value, 0)
            if value not in (0, 1, 2, 3):
                raise ConstraintError(f"constraint zero={value!r}: ZeRO stages are 0, 1 (optimizer state), 2 (and "
                                "gradients), 3 (and parameters: FSDP)")  # fmt: skip
        elif key == "sp":
            values[key] = _int(key, value, 0)
        elif key == "schedule":
            values[key] = _choice(key, value, SCHEDULES)
        elif key == "recompute":
            if isinstance(value, int) and not isinstance(value, bool) and value > 1:
                values["recompute_budget"] = value
                values[key] = "selective"
                continue
            text = _RECOMPUTE_ALIASES.get(str(value), value)
            values[key] = _choice(key, text, RECOMPUTE_MODES)
        elif key == "offload":
            values[key] = _choice(key, value, OFFLOAD_MODES)
        elif key == "cp_attention":
            way = _choice(key, value, (*CP_WAYS, "auto"))
            values[key] = None if way == "auto" else way
        else:
            values[key] = _choice(key, value, COLLECTIVE_MODES)
    sp = values.pop("sp", None)
    tp = values.get("tp")
    if sp is not None and sp not in (0, 1) and tp is not None and sp != tp:
        raise ConstraintError(
            f"constraint sp={sp}: sequence parallelism runs on the tensor-parallel axis, so sp is 1 (off) or equal "
            f"to tp ({tp})"
        )
    if sp is not None:
        values["sp"] = sp not in (0, 1)
    if values.get("microbatches") is not None and values.get("microbatch_size") is not None:
        raise ConstraintError("constraints microbatches and microbatch_size: pin one of them (the other follows)")
    world = cluster.world_size
    product = 1
    for key in ("pp", "dp", "tp", "cp"):
        product *= int(values.get(key, 1))  # type: ignore[call-overload]
        if int(values.get(key, 1)) > world:  # type: ignore[call-overload]
            raise ConstraintError(f"constraint {key}={values[key]} needs more devices than {cluster.name} has ({world})")
    if product > world:
        cp = f" x cp={values['cp']}" if values.get("cp", 1) != 1 else ""
        raise ConstraintError(
            f"constraints pp={values.get('pp', 1)} x dp={values.get('dp', 1)} x tp={values.get('tp', 1)}{cp} need "
            f"{product} devices; {cluster.name} has {world}"
        )
    ep, dp = values.get("ep"), values.get("dp")
    if ep is not None and ep > 1 and dp is not None and dp % ep:  # type: ignore[operator]
        raise ConstraintError(
            f"constraints ep={ep} dp={dp}: expert parallelism splits the experts over ep of the data-parallel ranks, "
            f"so ep divides dp (pin dp to a multiple of {ep}, or leave dp to the search)"
        )
    if values.get("cp", 1) != 1 and values.get("pp", 1) != 1 and values.get("ep", 1) != 1:
        raise ConstraintError(
            f"constraints cp={values['cp']}, ep={values['ep']} and pp={values['pp']}: a pipeline's stages split their "
            "sequence (cp) or their experts (ep), not both: drop one of them"
        )
    if values.get("schedule") == "interleaved" and values.get("virtual") == 1:
        values["schedule"] = "1f1b"  # one chunk per device: interleaving is plain 1F1B
    return Constraints(**values)  # type: ignore[arg-type]
