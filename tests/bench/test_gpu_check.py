"""The CPU parts of bench/gpu_check.py (issue 19, point 6): what it says without CUDA, its measurements, the
cluster it describes a GPU machine with, its bf16 comparison, and a whole run on CPU processes with the
generated Triton kernels under Triton's interpreter (fp32 there: every fused group must run its kernel)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import gpu_check  # noqa: E402  (bench/ is a directory of scripts)

from shardwise.cluster import presets  # noqa: E402


def test_without_cuda_it_says_so_and_exits_0(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_published_peaks_of_the_devices_the_presets_know():
    assert gpu_check.published_peak("NVIDIA A100-SXM4-80GB")[0] is presets.A100_SXM4_80GB
    assert gpu_check.published_peak("NVIDIA H100 80GB HBM3")[0] is presets.H100_SXM5_80GB
    assert gpu_check.published_peak("Tesla V100-SXM2-32GB")[0] is presets.V100_SXM2_32GB
    assert gpu_check.published_peak("NVIDIA GeForce RTX 4090") == (None, "")


def test_measurements_and_the_local_cluster():
    assert gpu_check.measure_gemm("cpu", "float32", 64, 0.01) > 0
    assert gpu_check.measure_copy("cpu", "cpu", 2**20, 0.01) > 0
    measured = gpu_check.calibration("cpu", "cpu", 1, quick=True)
    assert measured["gemm"]["float32"]["tflops"] > 0 and measured["memory"]["gbps"] > 0
    assert measured["gemm"]["float32"]["efficiency"] is None  # no published peak for this device
    measured["peer_copy_gbps"] = 150.0
    known = gpu_check.local_cluster(2, "NVIDIA A100-SXM4-80GB", 80 * 2**30, measured)
    assert known.world_size == 2 and known.device.peak_flops == presets.A100_SXM4_80GB.peak_flops
    assert known.switches[0].port_bandwidth == 150e9 and known.switches[0].kind == "nvswitch"
    unknown = gpu_check.local_cluster(1, "Some GPU", 8 * 2**30, measured)
    assert dict(unknown.device.peak_flops)["float32"] == measured["gemm"]["float32"]["tflops"] * 1e12


def test_bf16_comparison():
    want = torch.tensor([1.0, -2.0, 0.001, 4.0])
    assert gpu_check.compare(want * (1 + 1e-2), want)["close"]  # within bf16's rounding of a few ops
    assert not gpu_check.compare(want + torch.tensor([0.0, 0.0, 0.0, 0.2]), want)["close"]
    assert not gpu_check.compare(want[:3], want)["close"]
    assert not gpu_check.compare(want * float("nan"), want)["close"]


@pytest.mark.multiproc
def test_a_whole_run_on_cpu_with_the_triton_interpreter(tmp_path):
    out = tmp_path / "gpu_check.json"
    argv = ["--cpu-interpret", "--models", "gpt2", "--size", "tiny", "--processes", "1", "--repeats", "2",
            "--steps", "2", "--precision", "fp32", "--out", str(out)]  # fmt: skip
    assert gpu_check.main(argv) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {(r["mode"], r["fusion"]) for r in rows} == {(m, f) for m in ("inference", "train") for f in (True, False)}
    assert result["ok"] and all(r["ok"] for r in rows)
    for r in rows:
        if r["fusion"]:  # every fused group of a forward (and a training step) ran its Triton kernel
            assert r["fused_groups"] > 0 and 0 < r["groups_on_triton"] == r["group_calls"], r
        else:
            assert r["triton_launches"] == 0, r
    inference = [r for r in rows if r["mode"] == "inference"]
    assert all(r["rel_err"] < 1e-5 for r in inference)  # fp32: the kernels compute what eager computes
    assert result["calibration"]["gemm"]["float32"]["tflops"] > 0
