"""Compile a built-in GPT-2 for two local processes, inspect the plan, run it, export the package.

    .venv/bin/python examples/quickstart.py
"""

from __future__ import annotations

import torch

import shardwise
from shardwise.zoo import build_model

model, inputs = build_model("gpt2", "small")  # random weights: nothing is downloaded
with shardwise.compile(model, "cpu:2", example_inputs=inputs, constraints={"dp": 2}) as cm:
    print(cm.plan.summary())
    for alternative in cm.plan.alternatives:
        print("  candidate", dict(alternative.degrees), f"{alternative.step_time_s * 1e3:.3f} ms", alternative.note)
    outputs = cm.run(*inputs)  # two worker processes (no `if __name__ == "__main__":` guard needed)
    with torch.no_grad():
        expected = model(*inputs)
    print("max |shardwise - eager| =", (outputs.logits - expected.logits).abs().max().item())
    path = cm.save("out/gpt2_cpu2")
    print("drop-in package written to", path)
