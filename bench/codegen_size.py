"""Size of the generated program as a model gets deeper: ``python bench/codegen_size.py``.

For GPT-2 (the ``small`` zoo configuration) with 4 and with 16 layers, three plans made the way a user makes
them (``shardwise plan gpt2:small,layers=N --cluster cpu:2 [options]``, then ``shardwise codegen``):
tensor parallel (``-C tp=2``), the default plan, and a training plan (``--mode train``). Per plan: the lines
of ``program.py`` and ``kernels.py``, the kernels written, and how many lines are longer than 120
columns; per pair the ratio 16 layers / 4 layers (issue 19's goal: at most 1.15 for both files).
``--root DIR`` measures the shardwise of another checkout (e.g. before a change). Writes
bench/results/codegen_size.json (``--output`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
LAYERS = (4, 16)
PLANS = {  # name -> options of `shardwise plan`
    "tp2": ["-C", "tp=2"],
    "default": [],
    "train": ["--mode", "train"],
}


def _shardwise(root: Path, work: Path, *args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(root))
    cli = [sys.executable, "-c", "from shardwise.cli.main import main; main()"]
    # run elsewhere than a checkout: ``python -c`` would import the shardwise of its working directory
    subprocess.run([*cli, *args, "-q"], check=True, env=env, cwd=work, capture_output=True, text=True)


def _measure(root: Path, plan: str, layers: int, work: Path) -> dict:
    plan_file = work / f"{plan}-{layers}.json"
    package = work / f"pkg_{plan}_{layers}"
    _shardwise(root, work, "plan", f"gpt2:small,layers={layers}", "--cluster", "cpu:2", *PLANS[plan], "-o", str(plan_file))
    _shardwise(root, work, "codegen", str(plan_file), "-o", str(package), "--no-weights")
    out: dict = {}
    for name in ("program.py", "kernels.py"):
        path = package / name
        lines = path.read_text().splitlines() if path.exists() else []
        out[name] = len(lines)
        out[f"{name} over 120"] = sum(1 for line in lines if len(line) > 120)
    kernels = package / "kernels.py"
    text = kernels.read_text() if kernels.exists() else ""
    out["kernels"] = len(re.findall(r"^def _\w+_eager\(", text, re.M))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT.parent, help="checkout whose shardwise is measured")
    parser.add_argument("--output", type=Path, default=RESULTS / "codegen_size.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="codegen-size-") as tmp:
        for plan in PLANS:
            measured = {n: _measure(args.root.resolve(), plan, n, Path(tmp)) for n in LAYERS}
            small, big = measured[LAYERS[0]], measured[LAYERS[-1]]
            row = {"plan": plan}
            for n in LAYERS:
                row.update({f"{k} ({n} layers)": v for k, v in measured[n].items()})
            for name in ("program.py", "kernels.py"):
                row[f"{name} ratio"] = round(big[name] / small[name], 3) if small[name] else None
            rows.append(row)
    header = ["plan", "program 4", "program 16", "ratio", "kernels 4", "kernels 16", "ratio", "kernels written",
              "lines > 120"]  # fmt: skip
    print(" | ".join(header))
    for r in rows:
        cells = [
            r["plan"],
            r["program.py (4 layers)"], r["program.py (16 layers)"], r["program.py ratio"],
            r["kernels.py (4 layers)"], r["kernels.py (16 layers)"], r["kernels.py ratio"],
            f"{r['kernels (4 layers)']} / {r['kernels (16 layers)']}",
            sum(r[f"{f} over 120 ({n} layers)"] for f in ("program.py", "kernels.py") for n in LAYERS),
        ]  # fmt: skip
        print(" | ".join(str(c) for c in cells))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = {"model": "gpt2:small", "layers": list(LAYERS), "cluster": "cpu:2", "plans": PLANS, "rows": rows}
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
