"""What a user sees from each launcher when things go right and wrong, measured here.

For each launcher (mpify ranch, torch.multiprocessing.spawn, torchrun's engine elastic_launch,
accelerate's notebook_launcher when installed) and each scenario, a fresh Python process runs
the launch and reports: what the caller got back, the exception type, whether the rank's own
error message and traceback reached the caller, how long it took, and how many of its child
processes were still alive right after the call returned (then killed).

    python benchmarks/compare_failures.py [-n 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

from _machine import machine
from bench_launch import HERE, RUNNERS

PROBE = """
import json, os, sys, time, traceback
sys.path.insert(0, {here!r})
import psutil, torch
import _workers
N, FN, REPEAT = {n}, {fn!r}, 0
{runner}
report = {{}}
if FN == "sleeps":  # Jupyter's "Interrupt kernel": SIGINT to the kernel's process group
    import signal, threading
    threading.Timer(4.0, lambda: os.killpg(os.getpgid(0), signal.SIGINT)).start()
start = time.perf_counter()
try:
    report["returned"] = repr(launch_result())
except BaseException as exc:
    text = "".join(traceback.format_exception(exc))
    report["raised"] = type(exc).__name__
    report["message_reached"] = "boom in rank 1" in text
    report["rank_traceback"] = "raises_in_rank_1" in text
    report["signal_named"] = "SIGKILL" in text or "Signals.SIGKILL" in text or "signal 9" in text
report["seconds"] = round(time.perf_counter() - start - (4.0 if FN == "sleeps" else 0), 2)
kids = psutil.Process().children(recursive=True)
time.sleep(0.2)
report["left_alive"] = sum(1 for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE
                           and "forkserver" not in " ".join(k.cmdline()) and "resource_tracker" not in " ".join(k.cmdline()))
for k in kids:
    try:
        k.kill()
    except psutil.Error:
        pass
print("REPORT", json.dumps(report))
"""

# How each runner returns its result: RUNNERS define launch(); wrap it to keep the value.
RESULT = {
    "mpify ranch": "ranch(N, getattr(_workers, FN))",
    "torch.mp.spawn": None,
    "torchrun engine (elastic_launch)": None,
    "accelerate notebook_launcher": None,
}

SCENARIOS = [("returns_value", "rank 0 returns 0 (others 10, 20)"),
             ("raises_in_rank_1", "rank 1 raises ValueError"),
             ("killed_in_allreduce", "rank 1 SIGKILLed in all_reduce"),
             ("sleeps", "interrupted (SIGINT to the process group, as Jupyter does) 4 s into the launch")]


def probe(name: str, fn: str, n: int, limit: float) -> dict:
    runner = textwrap.dedent(RUNNERS[name])
    if name == "mpify ranch":
        runner += "\ndef launch_result():\n    return ranch(N, getattr(_workers, FN))\n"
    elif name == "torchrun engine (elastic_launch)":
        runner += textwrap.dedent("""
            def launch_result():
                cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=N, run_id=str(uuid.uuid4()),
                                   rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                                   monitor_interval=0.1, start_method="spawn")
                return elastic_launch(cfg, getattr(_workers, FN))()
        """)
    elif name == "torch.mp.spawn":
        runner += "\ndef launch_result():\n    launch()\n    return None  # spawn returns no values\n"
    else:
        runner += textwrap.dedent("""
            def launch_result():
                return notebook_launcher(getattr(_workers, FN), (), num_processes=N)
        """)
    code = PROBE.format(here=HERE, n=n, fn=fn, runner=runner)
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=limit,
                              start_new_session=True,
                              env={k: v for k, v in os.environ.items() if k != "MASTER_PORT"})
    except subprocess.TimeoutExpired:
        return {"hung": f"no answer in {limit:.0f} s (killed)"}
    for line in proc.stdout.splitlines():
        if line.startswith("REPORT "):
            return json.loads(line[7:])
    return {"skipped": (proc.stderr.strip().splitlines() or ["?"])[-1][:60]}


def describe(r: dict) -> str:
    if "hung" in r or "skipped" in r:
        return r.get("hung") or "skipped: " + r["skipped"]
    if "returned" in r:
        what = f"returned {r['returned']}"
    else:
        bits = [f"raised {r['raised']}"]
        if r.get("message_reached"):
            bits.append("rank's message")
        if r.get("rank_traceback"):
            bits.append("rank's traceback")
        if r.get("signal_named"):
            bits.append("names SIGKILL")
        what = ", ".join(bits)
    left = f", {r['left_alive']} process(es) left" if r.get("left_alive") else ""
    after = " after the signal" if "KeyboardInterrupt" in what else ""
    return f"{what} in {r['seconds']} s{after}{left}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", "--nprocs", type=int, default=3)
    ap.add_argument("--limit", type=float, default=90.0, help="seconds before a launch counts as hung")
    a = ap.parse_args()
    print(f"What the caller sees, N={a.nprocs}; {machine()}")
    for fn, title in SCENARIOS:
        print(f"\n{title}:")
        for name in RUNNERS:
            print(f"  {name:34} {describe(probe(name, fn, a.nprocs, a.limit))}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
