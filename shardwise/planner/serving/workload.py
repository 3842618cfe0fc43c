"""Serving workloads: prompt and output length distributions and an arrival process (Poisson at a rate).

A workload is a name (``WORKLOADS``; ``fixed:PROMPT,OUTPUT`` for constant lengths) or a JSON/YAML file::

    name: my-chat
    prompt: {distribution: lognormal, mean: 512, sigma: 1.0, min: 4, max: 2048}
    output: {distribution: fixed, value: 128}
    arrival: {process: poisson, rate: 2.0}
    max_total: 2048            # optional: requests longer than this (prompt + output) are drawn again

or a file holding a list of ``[prompt_len, output_len]`` pairs (DistServe's workload files), or an object
``{"name": ..., "source": ..., "pairs": [[prompt_len, output_len], ...]}``, sampled uniformly. Distributions: ``fixed`` (``value``), ``uniform`` (``min``, ``max``), ``lognormal`` (``mean`` of the
lengths and ``sigma`` of their logarithm, clipped to [``min``, ``max``]). The arrival rate only seeds the
search: serve-plan bisects the rate itself.

``sharegpt``: ShareGPT-like chat lengths. Means from Kwon et al., vLLM (SOSP'23), Fig. 11: ShareGPT prompts
average 161.31 tokens and outputs 337.99; the log-normal shape with sigma 1.0 is our assumption (the paper
shows histograms, not a fit); requests of 2048 tokens or more are drawn again, as DistServe's dataset
preparation prunes them (evaluation/2-benchmark-serving/0-prepare-dataset.py: prompt + output < 2048).
It is **not** DistServe's workload.

``distserve-sharegpt``: DistServe's own ShareGPT workload, the (prompt, output) pairs its dataset preparation
makes (multi-turn prompts: earlier turns of a conversation are part of the prompt), rebuilt by
``bench/distserve_sharegpt.py`` (``data/distserve_sharegpt.json`` says how, and what differs from DistServe's
run); requests are drawn uniformly from the pairs, as DistServe's simulator and benchmark draw them.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from shardwise.errors import UserInputError

__all__ = ["LengthDist", "Workload", "Request", "WORKLOADS", "load_workload"]

DISTRIBUTIONS = ("fixed", "uniform", "lognormal")
_FILE_HELP = (
    "a workload file holds `prompt:` and `output:` distributions ({distribution: lognormal, mean: 512, "
    "sigma: 1.0, min: 4, max: 2048} | {distribution: fixed, value: 128} | {distribution: uniform, min: 1, max: 64}) "
    "and `arrival: {process: poisson, rate: 2.0}`, or a list of [prompt_len, output_len] pairs"
)


@dataclass(frozen=True)
class LengthDist:
    """A distribution of token counts (see the module docstring). Invariants: lengths drawn are >= 1."""

    distribution: str
    value: int = 0
    mean: float = 0.0
    sigma: float = 0.0
    low: int = 1
    high: int = 1 << 20
    values: tuple[int, ...] = ()

    def draw(self, rng: random.Random) -> int:
        if self.distribution == "fixed":
            return self.value
        if self.distribution == "uniform":
            return rng.randint(self.low, self.high)
        if self.distribution == "empirical":
            return rng.choice(self.values)
        mu = math.log(self.mean) - self.sigma**2 / 2
        return min(self.high, max(self.low, round(rng.lognormvariate(mu, self.sigma))))


@dataclass(frozen=True)
class Request:
    """One request: when it arrives (seconds), its prompt and output lengths (tokens)."""

    id: int
    arrival: float
    prompt: int
    output: int


@dataclass(frozen=True)
class Workload:
    """Prompt and output lengths and a Poisson arrival rate; ``pairs`` (when given) are drawn whole."""

    name: str
    prompt: LengthDist
    output: LengthDist
    rate: float = 1.0
    max_total: int = 0  # 0: no limit
    pairs: tuple[tuple[int, int], ...] = ()
    source: str = ""

    def lengths(self, n: int, seed: int = 0) -> list[tuple[int, int]]:
        """``n`` (prompt, output) pairs, reproducibly."""
        rng = random.Random(seed)
        out: list[tuple[int, int]] = []
        while len(out) < n:
            if self.pairs:
                out.append(rng.choice(self.pairs))
                continue
            p, o = self.prompt.draw(rng), self.output.draw(rng)
            if self.max_total and p + o >= self.max_total:
                continue
            out.append((p, o))
        return out

    def requests(self, n: int, rate: float | None = None, seed: int = 0) -> list[Request]:
        """``n`` requests arriving as a Poisson process at ``rate`` per second (the workload's own by
        default). The same seed gives the same lengths and the same arrivals scaled by 1 / rate, so rates
        compare on one sample."""
        rate = self.rate if rate is None else rate
        if rate <= 0:
            raise UserInputError(f"arrival rate {rate} must be > 0 requests per second")
        rng = random.Random(seed + 1)
        t = 0.0
        out = []
        for i, (p, o) in enumerate(self.lengths(n, seed)):
            t += rng.expovariate(1.0)
            out.append(Request(i, t / rate, p, o))
        return out

    def means(self, n: int = 2000, seed: int = 0) -> tuple[float, float]:
        pairs = self.lengths(n, seed)
        return sum(p for p, _ in pairs) / n, sum(o for _, o in pairs) / n


WORKLOADS: dict[str, Workload] = {
    "sharegpt": Workload(
        "sharegpt",
        LengthDist("lognormal", mean=161.31, sigma=1.0, low=4, high=2047),
        LengthDist("lognormal", mean=337.99, sigma=1.0, low=4, high=2047),
        max_total=2048,
        source="means: Kwon et al., vLLM (SOSP'23) Fig. 11 (ShareGPT: prompts 161.31, outputs 337.99 tokens); "
        "log-normal shape, sigma 1.0: our assumption; prompt + output < 2048 as DistServe's dataset preparation",
    ),
}


#: workloads shipped as data files next to this module (name -> file under data/)
DATA_WORKLOADS = {"distserve-sharegpt": "distserve_sharegpt.json"}


@cache
def _data_workload(name: str) -> Workload:
    path = Path(__file__).parent / "data" / DATA_WORKLOADS[name]
    if not path.is_file():
        raise UserInputError(
            f"workload {name!r}: its data file {path} is missing from this installation; reinstall shardwise "
            "from its source tree, or pass the file's path"
        )
    return _from_data(json.loads(path.read_text(encoding="utf-8")), name, str(path))


def _dist(data: Any, what: str, where: str) -> LengthDist:
    if isinstance(data, int) and data >= 1:
        return LengthDist("fixed", value=data)
    if not isinstance(data, dict):
        raise UserInputError(f"{where}: `{what}` must be a distribution or a token count; {_FILE_HELP}")
    kind = data.get("distribution", "fixed")
    try:
        if kind == "fixed":
            dist = LengthDist("fixed", value=int(data["value"]))
        elif kind == "uniform":
            dist = LengthDist("uniform", low=int(data["min"]), high=int(data["max"]))
        elif kind == "lognormal":
            dist = LengthDist(
                "lognormal", mean=float(data["mean"]), sigma=float(data.get("sigma", 1.0)),
                low=int(data.get("min", 1)), high=int(data.get("max", 1 << 20)),
            )  # fmt: skip
        else:
            raise UserInputError(
                f"{where}: `{what}` distribution {kind!r} is unknown: use one of {', '.join(DISTRIBUTIONS)}"
            )
    except KeyError as exc:
        raise UserInputError(f"{where}: `{what}` ({kind}) needs {exc.args[0]!r}; {_FILE_HELP}") from None
    except (TypeError, ValueError):
        raise UserInputError(f"{where}: `{what}` has a value that is not a number; {_FILE_HELP}") from None
    if dist.value < 0 or dist.low < 1 or dist.high < dist.low or (kind == "fixed" and dist.value < 1):
        raise UserInputError(f"{where}: `{what}` lengths must be >= 1 token with min <= max")
    if kind == "lognormal" and (dist.mean <= 0 or dist.sigma < 0):
        raise UserInputError(f"{where}: `{what}` needs mean > 0 and sigma >= 0")
    return dist


def _from_data(data: Any, name: str, where: str) -> Workload:
    if isinstance(data, list):
        try:
            pairs = tuple((int(p), int(o)) for p, o in data)
        except (TypeError, ValueError):
            raise UserInputError(f"{where}: a list workload holds [prompt_len, output_len] pairs") from None
        if not pairs or any(p < 1 or o < 1 for p, o in pairs):
            raise UserInputError(f"{where}: a list workload needs at least one pair, every length >= 1")
        empty = LengthDist("fixed", value=1)
        return Workload(name, empty, empty, pairs=pairs, source=where)
    if not isinstance(data, dict):
        raise UserInputError(f"{where} is not a workload: {_FILE_HELP}")
    if "pairs" in data:
        listed = _from_data(data["pairs"], str(data.get("name", name)), where)
        return Workload(listed.name, listed.prompt, listed.output, pairs=listed.pairs,
                        source=str(data.get("source", where)))  # fmt: skip
    unknown = set(data) - {"name", "prompt", "output", "arrival", "max_total", "source"}
    if unknown:
        raise UserInputError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; {_FILE_HELP}")
    for key in ("prompt", "output"):
        if key not in data:
            raise UserInputError(f"{where}: missing `{key}`; {_FILE_HELP}")
    arrival = data.get("arrival", {}) or {}
    if not isinstance(arrival, dict) or arrival.get("process", "poisson") != "poisson":
        raise UserInputError(f"{where}: `arrival` must be {{process: poisson, rate: R}} (Poisson arrivals)")
    try:
        rate = float(arrival.get("rate", 1.0))
    except (TypeError, ValueError):
        rate = -1.0
    if not rate > 0:
        raise UserInputError(f"{where}: the arrival rate must be a number > 0 (requests per second)")
    return Workload(
        str(data.get("name", name)), _dist(data["prompt"], "prompt", where), _dist(data["output"], "output", where),
        rate=rate, max_total=int(data.get("max_total", 0) or 0), source=str(data.get("source", where)),
    )  # fmt: skip


def load_workload(spec: str) -> Workload:
    """A workload by name (``WORKLOADS``, ``fixed:P,O``) or from a JSON/YAML file (see the module docstring)."""
    text = spec.strip()
    if text in WORKLOADS:
        return WORKLOADS[text]
    if text in DATA_WORKLOADS:
        return _data_workload(text)
    if text.startswith("fixed:"):
        try:
            p, o = (int(x) for x in text[6:].split(","))
        except ValueError:
            raise UserInputError(
                f"workload {text!r}: write fixed:PROMPT,OUTPUT, e.g. fixed:512,128"
            ) from None
        if p < 1 or o < 1:
            raise UserInputError(f"workload {text!r}: lengths must be >= 1 token")
        return Workload(
            text, LengthDist("fixed", value=p), LengthDist("fixed", value=o), source="fixed lengths"
        )
    path = Path(text)
    if not path.is_file():
        raise UserInputError(
            f"workload {text!r} is neither a known name ({', '.join([*WORKLOADS, *DATA_WORKLOADS])}, fixed:P,O) "
            f"nor a file; {_FILE_HELP}"
        )
    raw = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(raw)
        else:
            import yaml

            data = yaml.safe_load(raw)
    except Exception as exc:  # json/yaml syntax errors
        raise UserInputError(
            f"{text} cannot be read as {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}"
        ) from None
    return _from_data(data, path.stem, text)
