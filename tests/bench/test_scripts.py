"""The benchmark scripts run end to end (tiny sizes, CPU): a GPU session must not be spent on a script error.

`bench/gpu.py --smoke` is exactly what a GPU call runs, on a tiny model; `bench/e2e.py` starts a real
`python -m service` subprocess; `bench/cpu.py` runs all four engines and its memory children. Timing values
are not asserted (benchmarks prove speed, tests do not); the outputs' shape and the parity checks are.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, timeout: float = 240) -> str:
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
def test_gpu_script_smoke(tmp_path: Path) -> None:
    """All of bench/gpu.py, compiled engines included (~90 s on 2 cores, Triton's interpreter included;
    the CUDA-only first compile of a compiled runner is taken on the CPU by tests/model/test_runner.py). Of
    the Triton engines, the compiled ones: the eager ones take the same steps (40 s more in the interpreter),
    and their network is checked against the plain one in tests/model/test_fused.py and
    test_triton_attention.py."""
    variants = "fused_compiled,triton_attn_compiled,triton_local_compiled"
    out = run("bench/gpu.py", "--smoke", "--workloads", "traffic", "--out", str(tmp_path),
              "--model-dir", str(tmp_path / "ckpt"), "--triton-variants", variants, timeout=400)  # fmt: skip
    assert "-> OK" in out, out
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["errors"] == {} and data["skipped"] == {}, (data["errors"], data["skipped"])
    assert {"card", "driver", "cuda", "torch", "triton", "transformers", "commit"} <= set(data)
    assert len(data["commit"]["hash"]) == 40 and data["commit"]["source"] == "git"
    assert data["parity"]["ok"] and data["parity_ungraphed"]["ok"] and data["parity_compiled_ungraphed"]["ok"]
    assert not data["parity"]["replayed"] and not data["parity_ungraphed"]["replayed"]  # no graphs here
    assert data["compile"]["warmup_s"] > 0 and data["compile"]["load_s"] >= data["compile"]["warmup_s"]
    assert data["compile_s"] is None  # on the CPU inductor compiles lazily, inside the warm-up
    (row,) = data["rows"]
    assert row["workload"] == "traffic" and row["ours_eager"] > 0 and row["hf_sorted"] > 0
    assert row["ours_compiled"] > 0 and data["compiled_vs_eager"] < 1e-4
    assert 0 < row["ours_eager_device_busy"] <= 1.05  # the runner's device time over the timed run
    assert {r["budget"] for r in data["budget_sweep"]} == {8192, 16384}
    assert data["latency"]["ours_eager"]["total_ms"] >= data["latency"]["ours_eager"]["launch_ms"] > 0
    assert "aten::" in data["profile_ours_eager"] and "aten::" in data["profile_ours_compiled"]
    assert data["budget"] == "16384 tokens (cpu default)"
    cases = {(m["engine"], m["case"]) for m in data["memory"]}
    assert ("ours", "1 x 256") in cases and ("hf", "1 x 256") in cases
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()  # kept for bench/e2e.py
    assert "| traffic |" in out and "best / HF arrival" in out
    # the steps ran in priority order: the plain engines' optional steps before our Triton kernels
    steps = list(data["step_s"])
    assert steps.index("profile ours_compiled") < steps.index("memory")
    if importlib.util.find_spec("triton") is None:  # the dev extra installs triton on Linux only
        assert data["triton"] == "skipped: the triton package is not installed"
        assert "fused_kernels" not in data and "triton_rows" not in data
        return
    # our Triton kernels' steps, here in Triton's interpreter (tests/conftest.py): the fused GEMMs alone, then
    # the fused-GEMM and Triton-attention engines, compiled, parity (also ungraphed) and a row each
    assert steps.index("memory") < steps.index("fused GEMMs: kernels")
    assert {r["op"] for r in data["fused_kernels"]} == {"qkv+rope", "wi+geglu"}
    assert all(r["max_diff_vs_compiled"] < 1e-4 for r in data["fused_kernels"])
    engines = {"fused_compiled", "triton_attn_compiled"}
    assert set(data["triton_parity"]) == set(data["triton_parity_ungraphed"]) == engines
    assert all(p["ok"] for p in [*data["triton_parity"].values(), *data["triton_parity_ungraphed"].values()])
    assert "CUDA flash kernel" in data["triton_skipped"]["triton_local_compiled"]
    assert all(data["triton_load"][e]["warmup_s"] > 0 for e in engines)
    assert data["triton_vs_first"]["triton_attn_compiled"] < 1e-4
    (triton_row,) = data["triton_rows"]
    assert triton_row["workload"] == "traffic" and all(triton_row[e] > 0 for e in engines)
    run("bench/plot.py", "--kernels", str(tmp_path / "gpu.json"), "--out", str(tmp_path))
    assert (tmp_path / "kernels.png").stat().st_size > 10_000


@pytest.mark.slow
def test_gpu_script_past_its_deadline_still_measures_and_tabulates(tmp_path: Path) -> None:
    """Past --deadline-s the optional steps are skipped, each with a line; parity and the workloads still
    run, --repeat times, and the table is printed."""
    out = run("bench/gpu.py", "--smoke", "--no-compile", "--workloads", "traffic", "--deadline-s", "1",
              "--repeat", "2", "--out", str(tmp_path), "--model-dir", str(tmp_path / "ckpt"))  # fmt: skip
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["errors"] == {} and data["parity"]["ok"]
    assert {"graph parity", "latency", "profile ours_eager", "memory", "budget sweep"} <= set(data["skipped"])
    assert "# -- memory: skipped (" in out and "s before its deadline of 1 s)" in out
    (row,) = data["rows"]
    assert len(row["ours_eager_runs"]) == 2 and row["ours_eager"] > 0
    assert "| traffic |" in out and "(±" in out and "# steps skipped: [" in out


def test_bucket_coverage_script(tmp_path: Path) -> None:
    run("bench/buckets.py", "--batches", "50", "--items", "1,16,64", "--json", str(tmp_path / "b.json"))
    data = json.loads((tmp_path / "b.json").read_text())
    rows = {(r["items"], r["set"]): r for r in data["rows"]}
    assert data["buckets"]["first"] == 5 and data["buckets"]["today"] > 5
    assert rows[1, "first"]["graphed"] == rows[1, "today"]["graphed"] == 1.0
    assert rows[64, "first"]["graphed"] == 0.0 < rows[64, "today"]["graphed"]
    assert rows[16, "today"]["blocks"] < rows[16, "first"]["blocks"]


@pytest.mark.slow
def test_cpu_script_all_engines_and_memory(tmp_path: Path) -> None:
    out = run(
        "bench/cpu.py", "--shape", "tiny", "--n", "6", "--repeat", "1", "--memory", "256,512",
        "--json", str(tmp_path / "c.json"),
    )  # fmt: skip
    data = json.loads((tmp_path / "c.json").read_text())
    assert set(data["seconds"]) == {"hf_arrival", "hf_sorted", "ours", "ours_compiled"}
    assert data["err"] < 1e-4 and data["err_compiled"] < 1e-4
    engines = {m["engine"]: m["rows"] for m in data["memory"]}
    assert set(engines) == {"ours", "hf"}
    assert [r["tokens"] for r in engines["ours"]] == [256, 512, 16384]
    assert all(r["peak_mib"] >= 0 for rows in engines.values() for r in rows)
    assert "MiB/1k tok" in out


@pytest.mark.slow
def test_e2e_script_against_a_real_server(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = run("bench/e2e.py", "--model", str(tiny_model_dir), "--device", "cpu", "--items", "40",
              "--concurrency", "1,4", "--items-per-call", "4", "--latency-calls", "5",
              "--json", str(tmp_path / "e.json"))  # fmt: skip
    data = json.loads((tmp_path / "e.json").read_text())
    assert [lv["concurrency"] for lv in data["levels"]] == [1, 4]
    assert all(lv["ok"] == 10 and not lv["errors"] for lv in data["levels"])
    assert data["grpc"] in data["levels"]  # the best level is the one the ratio uses
    assert data["engine"]["tokens_per_s"] > 0 and data["ratio"] > 0
    assert data["single_item"]["ok"] == 5 and data["single_item"]["p50_ms"] > 0
    assert all(0 < lv["device_busy"] <= 1.05 for lv in data["levels"])  # from safety_device_seconds_total
    assert data["engine"]["model_only_tokens_per_s"] > 0
    assert "gRPC / engine" in out and "one 128-token item per call" in out
    if sys.platform.startswith("linux"):  # each level says which server threads were busy (from /proc)
        threads = {t["thread"] for lv in data["levels"] for t in lv["server_threads"]}
        assert {"main", "safety-runner"} <= threads, threads
        assert all(0 <= t["busy"] < 3 for lv in data["levels"] for t in lv["server_threads"])
        assert "server threads at c=" in out
    run("bench/plot.py", "--grpc", str(tmp_path / "e.json"), "--out", str(tmp_path))
    assert (tmp_path / "latency.png").stat().st_size > 10_000


def test_host_script_stages(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = run("bench/host.py", "--model", str(tiny_model_dir), "--items", "64", "--items-per-call", "8",
              "--repeat", "1", "--batch-tokens", "2048", "--pending", "32",
              "--json", str(tmp_path / "h.json"))  # fmt: skip
    data = json.loads((tmp_path / "h.json").read_text())
    stages = {r["stage"]: r for r in data["stages"]}
    assert len(stages) == 9 and all(r["us_per_item"] > 0 for r in stages.values())
    assert [r["gil"] for r in stages.values()].count(False) == 1  # only Rust tokenization runs without it
    assert data["gil_us_per_item"] > 0 and data["tokens_per_item"] > 0
    assert "held the GIL, in all" in out


def test_e2e_on_a_simulated_device(tmp_path: Path, tiny_model_dir: Path) -> None:
    """bench/simdevice.py: the real tokenizer, scheduler and gRPC server on a device model of given speed."""
    run("bench/e2e.py", "--model", str(tiny_model_dir), "--simulate", "2e6,1", "--items", "48",
        "--concurrency", "1,4", "--items-per-call", "4", "--json", str(tmp_path / "s.json"))  # fmt: skip
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["device"].startswith("simulated")
    assert all(lv["ok"] == 12 and not lv["errors"] for lv in data["levels"])
    assert all(0 < lv["device_busy"] <= 1.05 for lv in data["levels"])
    assert 0 < data["engine"]["device_busy"] <= 1.05 and 0 < data["engine"]["model_only_device_busy"] <= 1.05


def test_tile_utilisation_script(tmp_path: Path) -> None:
    out = run("bench/tiles.py", "--json", str(tmp_path / "t.json"))
    rows = {r["workload"]: r for r in json.loads((tmp_path / "t.json").read_text())["rows"]}
    assert rows["short_fixed"]["global_128"] == 1.0  # 512 tokens: whole 128-tiles, nothing wasted
    for r in rows.values():  # a local layer wastes most of FA2's tiles; 64-row tiles waste less
        assert r["local_128"] < 0.4 < r["local_64"] < 0.75
        assert r["global_64"] >= r["global_128"]
    assert "| traffic |" in out
    grids = {
        (g["workload"], g["batches"], g["block"]): g
        for g in json.loads((tmp_path / "t.json").read_text())["grids"]
    }
    # one unsorted pack of the traffic mix: FA2's grid is sized by its longest sequence, so nearly every
    # program is empty; the planner's length-sorted batches keep most busy; the stream grid has none empty
    # and launches fewer programs than FA2's grid has working ones on any mixed-length batch
    assert grids["traffic", "one pack of 2,048", 128]["seq_grid_working"] < 0.1
    assert grids["traffic", "planner batches", 128]["seq_grid_working"] > 0.6
    for g in grids.values():
        assert g["stream_programs"] <= g["seq_grid_programs"] * g["seq_grid_working"] + 1e-9
        assert 0 < g["stream_local"] <= 1 and 0 < g["stream_global"] <= 1
    assert grids["long_fixed", "planner batches", 64]["stream_global"] == 1.0  # 8,192: whole blocks


def test_submit_memory_script(tmp_path: Path) -> None:
    """bench/submit_memory.py: `safety submit` in a fresh process against its own redis-server, by size."""
    out = run("bench/submit_memory.py", "--sizes", "50", "300", "--dir", str(tmp_path),
              "--json", str(tmp_path / "m.json"))  # fmt: skip
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert [(r["items"], r["code"]) for r in rows] == [(50, "this"), (300, "this")]
    # the child's own peak, not the parent's pages it forked from (the parent imports nothing heavy)
    assert all(10 < r["peak_rss_mb"] < 200 and r["wall_s"] > 0 for r in rows), rows
    assert "300 items  this" in out


@pytest.mark.slow
def test_deadlines_script_against_real_servers(tmp_path: Path, tiny_model_dir: Path) -> None:
    run("bench/deadlines.py", "--model", str(tiny_model_dir), "--horizons", "0,10000", "--bulk-items", "1",
        "--bulk-sentences", "200", "--prompts", "2", "--start-s", "0", "--gap-s", "0", "--deadline-s", "30",
        "--json", str(tmp_path / "d.json"))  # fmt: skip
    data = json.loads((tmp_path / "d.json").read_text())
    assert [r["horizon_ms"] for r in data["runs"]] == [0, 10000]
    assert all(len(r["prompt_ms"]) == 2 and r["failed"] == 0 and r["bulk_s"] > 0 for r in data["runs"])
    # the same on a simulated GPU (bench/simdevice.py serve)
    run("bench/deadlines.py", "--model", str(tiny_model_dir), "--horizons", "10000", "--bulk-items", "1",
        "--bulk-sentences", "200", "--prompts", "2", "--start-s", "0", "--gap-s", "0", "--deadline-s", "30",
        "--simulate", "1e6,0.5", "--json", str(tmp_path / "s.json"))  # fmt: skip
    runs = json.loads((tmp_path / "s.json").read_text())["runs"]
    assert len(runs) == 1 and runs[0]["failed"] == 0 and len(runs[0]["prompt_ms"]) == 2
