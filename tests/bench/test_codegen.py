"""`bench/codegen.py`: every Triton kernel × every autotuner config compiles for the H100 (sm_90) here, with
no GPU, and the code it compiles to is what a fast kernel needs: tensor-core dots as Hopper's wgmma, the
main loop's loads pipelined, the GEMMs' two products as one wgmma of twice the width, no register spill
inside a loop (the Wqkv + RoPE kernel's widest tiles spill a few bytes around it, in the epilogue), shared
memory within one SM's. A config that failed to
compile would crash Triton's autotuner on the card, in a GPU call this machine cannot rerun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_kernel_config_compiles_for_sm90_to_pipelined_wgmma(tmp_path: Path) -> None:
    import triton

    from model import fused, triton_attention

    out = tmp_path / "codegen.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    res = subprocess.run(
        [sys.executable, "bench/codegen.py", "--shape", "base", "--arch", "90", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    count = {name: sum(r["kernel"] == name for r in rows) for name in ("qkv_rope", "geglu", "attention")}
    # ModernBERT-base keeps every GEMM config (768 and 1,152 divide by every tile; 12 heads by 1, 2, 4);
    # attention: every tile, global and windowed
    assert count == {
        "qkv_rope": len(fused.configs(triton)),
        "geglu": len(fused.configs(triton)),
        "attention": 2 * len(triton_attention.configs(triton)),
    }
    for r in rows:
        where = f"{r['kernel']} {r['case']} {r['config']}"
        assert r["ok"], f"{where}: {r['error']}"
        assert r["mma"] == "wgmma", where
        assert r["pipelined"], where
        assert r["loop_spills"] == 0, where
        assert r["spill_bytes"] <= 256, where
        assert 0 < r["registers"] <= 255, where
        assert 1 <= r["blocks_per_sm"], where  # fits one SM's shared memory and registers
        assert r["loop_instructions"], where  # a main loop with tensor-core instructions
        if r["kernel"] != "attention":  # acc_a and acc_b come from one (BM, 2·BN) product: N = 2·BN
            bn = int(r["config"].split("BN")[1].split()[0])
            assert r["mma_shape"].split("x")[1] == str(min(2 * bn, 256)), where
        if r["kernel"] == "attention" and r["case"] == "global":
            # whole key blocks run in an unmasked loop, shorter than the masked one after it
            unmasked, masked = r["loop_instructions"]
            assert unmasked < 0.85 * masked, where
