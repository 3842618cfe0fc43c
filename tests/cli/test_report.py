"""The HTML report: self-contained, and its charts really render in headless Chromium; the timeline model."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from cli_helpers import cli, find_chromium

from shardwise.cli.planning import load_plan
from shardwise.cli.timeline import build_timeline
from shardwise.cluster import get_cluster

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1800",
)


@pytest.fixture(scope="module")
def train_report(mlp_train_plan: Path, cli_dir: Path) -> Path:
    path = cli_dir / "train-report.html"
    result = cli("report", mlp_train_plan, "-o", path)
    assert result.code == 0, result.err
    return path


def _embedded(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S)
    assert m is not None
    return json.loads(m.group(1))


def test_report_is_self_contained(train_report: Path, mlp_train_plan: Path) -> None:
    html = train_report.read_text()
    # no network: nothing is loaded from anywhere, and the page forbids it
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "url(" not in html
    assert "default-src 'none'" in html
    data = _embedded(html)
    plan = load_plan(mlp_train_plan)
    assert data["timeline"]["ranks"] == [0, 1]
    assert [m["rank"] for m in data["memory"]] == [0, 1]
    # training: forward, backward and the gradient reduction all appear on the timeline
    phases = {data["timeline"]["phases"][s[6]] for s in data["timeline"]["segments"]}
    assert {"forward", "backward", "gradients"} <= phases
    span = data["timeline"]["makespan_s"]
    assert span == pytest.approx(plan.predicted.step_time_s, rel=1e-12)
    assert "Sharding per layer" in html and "blocks.0" in html


def _png_pixels(png: bytes, max_rows: int) -> tuple[int, int, list[bytes]]:
    """Width, height and the RGB rows (at most ``max_rows`` from the top) of an 8-bit RGB(A) PNG, stdlib only."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, body = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert header is not None
    width, height, depth, color_type = header[:4]
    assert depth == 8 and color_type in (2, 6)
    bpp = 3 if color_type == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    prev = bytearray(stride)
    rows = []
    for y in range(min(height, max_rows)):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(b"".join(bytes(line[x : x + 3]) for x in range(0, stride, bpp)))
        prev = line
    return width, height, rows


def _count_color(rows: list[bytes], rgb: tuple[int, int, int], tol: int = 6) -> int:
    n = 0
    for row in rows:
        for x in range(0, len(row), 3):
            if all(abs(row[x + k] - rgb[k]) <= tol for k in range(3)):
                n += 1
    return n


def test_report_renders_in_headless_chromium(train_report: Path, tmp_path: Path) -> None:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(
            "no Chromium found (Debian: apt-get install chromium); the browser test of the report is skipped"
        )
    flags = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    url = train_report.resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    root = re.search(r"<html[^>]*>", html)
    assert root is not None
    # the page's script drew every chart and saw no error
    assert 'data-rendered="timeline memory comm"' in root.group(0), root.group(0)
    assert 'data-errors="0"' in root.group(0)
    assert re.search(r'<ul id="render-errors">\s*</ul>', html)
    assert "[rendered]</title>" in html
    segments = re.search(r'id="timeline"[^>]*data-segments="(\d+)"', html)
    assert segments is not None and int(segments.group(1)) >= 3
    assert html.count('class="seg seg-compute"') >= 2  # bars on both ranks
    assert 'id="memory-svg"' in html and 'id="comm-svg"' in html

    shot = tmp_path / "report.png"
    run = subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    width, height, rows = _png_pixels(shot.read_bytes(), max_rows=560)  # the header and the timeline
    assert (width, height) == (1400, 1800)
    # the timeline's bars are in the picture: forward compute, backward compute and gradient reduction colours
    for rgb in ((0x3B, 0x7D, 0xD8), (0x1F, 0x4F, 0x96), (0xC0, 0x39, 0x2B)):
        assert _count_color(rows, rgb) > 500, rgb


@pytest.fixture(scope="module")
def mlp_pipeline_plan():
    """A real pipeline plan: the MLP in 2 stages x 2 replicas on cpu:4, 4 micro-batches, 1F1B."""
    import shardwise
    from shardwise.zoo import build_model

    model, inputs = build_model("mlp", "tiny", layers=4, batch=8)
    cm = shardwise.compile(
        model, "cpu:4", example_inputs=inputs, mode="train", loss_fn=lambda out: out.pow(2).mean(),
        constraints={"pp": 2, "dp": 2, "tp": 1, "microbatches": 4, "schedule": "1f1b"},
    )  # fmt: skip
    return cm.plan


def test_pipeline_timeline_draws_the_price_lists_schedule(mlp_pipeline_plan) -> None:
    plan = mlp_pipeline_plan
    tl = build_timeline(plan, get_cluster("cpu:4"))
    assert tl.stages == 2 and tl.micro_batches == 4 and tl.ranks == [0, 1, 2, 3]
    assert tl.makespan_s == plan.predicted.step_time_s  # the one price of this layout, drawn
    totals = tl.totals()
    assert totals[0] == pytest.approx(totals[1]) and totals[2] == pytest.approx(totals[3])  # dp replicas agree
    assert totals[0]["bubble"] > 0 and totals[2]["bubble"] > 0  # stages wait for each other
    for r in tl.ranks:
        segs = sorted((s for s in tl.segments if s.rank == r), key=lambda s: s.start_s)
        assert sum(s.duration_s for s in segs) == pytest.approx(tl.makespan_s)  # the row is covered, no overlap
        for a, b in zip(segs, segs[1:], strict=False):
            assert b.start_s >= a.start_s + a.duration_s - 1e-12
    # 1F1B on the first stage: one warm-up forward, then forwards and backwards alternate
    order = []
    for s in sorted((s for s in tl.segments if s.rank == 0 and s.microbatch >= 0), key=lambda s: s.start_s):
        step = (s.phase[0].upper(), s.microbatch)
        if s.phase in ("forward", "backward") and (not order or order[-1] != step):
            order.append(step)
    assert order == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3), ("B", 2), ("B", 3)]
    # a stage's backward of micro-batch j starts after the next stage finished its backward of j
    b_end = {s.microbatch: s.start_s + s.duration_s for s in tl.segments if s.rank == 2 and s.phase == "backward"}
    b_start = min(s.start_s for s in tl.segments if s.rank == 0 and s.phase == "backward" and s.microbatch == 0)
    assert b_start >= b_end[0] - 1e-12
    # each stage's work is its chunks' priced times, once per micro-batch, plus its gradients and optimizer
    spec = plan.pipeline
    for p, r in ((0, 0), (1, 2)):
        work = sum(4 * (st.forward_s + st.backward_s) for st in spec.stages if st.device_stage == p)
        tail = sum(s.duration_s for s in tl.segments if s.rank == r and s.phase == "gradients")
        assert totals[r]["compute"] + totals[r]["comm"] == pytest.approx(work + tail)


def test_single_stage_timeline_is_the_prediction(gpt2_plan: Path) -> None:
    plan = load_plan(gpt2_plan)
    tl = build_timeline(plan, get_cluster("cpu:2"))
    assert tl.stages == 1 and tl.micro_batches == 1
    assert tl.makespan_s == pytest.approx(plan.predicted.step_time_s, rel=1e-12)
    totals = tl.totals()
    assert totals[0]["bubble"] == pytest.approx(0.0, abs=1e-12)
    assert totals[0]["comm"] == pytest.approx(plan.predicted.comm_s, rel=1e-9)
    assert totals[0]["compute"] == pytest.approx(plan.predicted.compute_s, rel=1e-9)
