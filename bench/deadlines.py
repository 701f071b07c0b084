"""Head-of-line blocking under one large call: how 1-item prompts with a short deadline fare while a bulk call
without one runs, for each `--horizon-ms` (SAFETY_DEADLINE_HORIZON_MS: 0 is first come, first served; the
default is deadline order with a 10 s horizon). Starts `python -m service` on loopback per run.

    python bench/deadlines.py --horizons 0,10000,0,10000 --json docs/bench-data/deadlines-cpu.json
    python bench/deadlines.py --model DIR --bulk-items 1 --prompts 4    # a quick look
    python bench/deadlines.py --simulate 2e5 --horizons 10000 --deadline-s 1    # on a simulated GPU

Per run: the bulk call's wall time, and each prompt's latency in ms (-1: DEADLINE_EXCEEDED or another
error), prompts sent one after the other, `--gap-s` apart, from `--start-s` after the bulk call.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.client import SafetyClient  # noqa: E402

SENTENCE = "The committee reviewed item {i} of the quarterly report and approved it."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(args: argparse.Namespace, horizon_ms: float) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "service", "--address", f"127.0.0.1:{port}"]
    # --simulate: the same server on a simulated GPU (bench/simdevice.py): packed batches, two in flight
    if args.simulate:
        rate, _, launch_ms = args.simulate.partition(",")
        command = [sys.executable, str(ROOT / "bench" / "simdevice.py"), "serve", "--rate", rate]
        command += ["--launch-ms", launch_ms or "0", "--address", f"127.0.0.1:{port}"]
    command += ["--metrics-address", "127.0.0.1:0", "--deadline-horizon-ms", str(horizon_ms)]
    command += ["--model", args.model] if args.model else []
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # no retries: a refusal or deadline miss is what this counts
        with SafetyClient(f"127.0.0.1:{port}", timeout=args.bulk_timeout_s, max_attempts=1) as client:
            ready_by = time.monotonic() + 180
            while True:  # the model loads and warms up
                try:
                    client.classify([{"text": "hi"}], timeout=5)
                    break
                except Exception:
                    if time.monotonic() > ready_by or server.poll() is not None:
                        raise
                    time.sleep(0.5)
            text = " ".join(SENTENCE.format(i=i) for i in range(args.bulk_sentences))
            bulk: dict[str, float] = {}

            def send_bulk() -> None:
                start = time.perf_counter()
                client.classify([{"text": text}] * args.bulk_items, timeout=args.bulk_timeout_s)
                bulk["s"] = time.perf_counter() - start

            thread = threading.Thread(target=send_bulk)
            thread.start()
            time.sleep(args.start_s)
            latencies, errors = [], []
            for i in range(args.prompts):
                start = time.perf_counter()
                try:
                    client.classify([{"text": f"how do I bake bread {i}?"}], timeout=args.deadline_s)
                    latencies.append(round(1000 * (time.perf_counter() - start)))
                except Exception as e:
                    latencies.append(-1)
                    errors.append(f"prompt {i}: {type(e).__name__}: {e}"[:300])
                time.sleep(args.gap_s)
            thread.join()
    finally:
        server.terminate()
        server.wait(30)
    return {
        "horizon_ms": horizon_ms,
        "bulk_chars": args.bulk_items * len(text),
        "bulk_s": round(bulk.get("s", float("nan")), 2),
        "prompt_ms": latencies,
        "failed": sum(x < 0 for x in latencies),
        "errors": errors,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--horizons", default="0,10000", help="SAFETY_DEADLINE_HORIZON_MS of each run, in order")
    p.add_argument("--bulk-items", type=int, default=4, help="texts in the bulk call")
    p.add_argument("--bulk-sentences", type=int, default=2500, help="sentences per bulk text (~73 chars)")
    p.add_argument("--bulk-timeout-s", type=float, default=300.0)
    p.add_argument("--prompts", type=int, default=30)
    p.add_argument("--deadline-s", type=float, default=2.0, help="each prompt's deadline")
    p.add_argument("--start-s", type=float, default=0.5, help="first prompt this long after the bulk call")
    p.add_argument("--gap-s", type=float, default=0.5, help="pause after each prompt")
    p.add_argument("--json", default=None, help="write the runs here too")
    simulate = "serve on a simulated GPU of RATE tokens/s (bench/simdevice.py) instead of the CPU"
    p.add_argument("--simulate", default=None, metavar="RATE[,LAUNCH_MS]", help=simulate)
    args = p.parse_args()
    runs = []
    for horizon in args.horizons.split(","):
        run = one_run(args, float(horizon))
        print(json.dumps(run), flush=True)
        runs.append(run)
    if args.json:
        info = {"cpus": os.cpu_count(), "args": vars(args), "runs": runs}
        Path(args.json).write_text(json.dumps(info, indent=1) + "\n")


if __name__ == "__main__":
    main()
