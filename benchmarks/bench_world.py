"""A live world in a real Jupyter kernel: `%%ranch` cells and `%mpify start`, with nbdistributed
beside it where it is installed.

    python benchmarks/bench_world.py [-n 4] [--repeat 5] [--cells 30] [--no-peer]

Every figure is a cell's Jupyter round trip, as the user waits for it: from the execute request
to the kernel's idle status on iopub (jupyter_client, a kernel of this interpreter). Medians.
- trivial cell: `%%ranch\\npass` on N ranks against a plain `pass` in the same kernel, `--cells`
  of each, interleaved; the overhead is the difference of the medians (goal <= 20 ms);
- `%mpify start N`: the first start in a kernel that has imported torch (cold: the forkserver
  starts and imports torch), then `--repeat` starts after a `%mpify stop` (warm), without and with
  `--ddp` (goal <= 0.5 s). The first `--ddp` start is reported apart: the forkserver is started
  again, preloading torch._dynamo (which DDP's first construction imports) for every later rank;
- a DDP step loop (nn.Linear(32, 32) in DDP, SGD, 20 steps on random data): as a `%%ranch` cell
  in a `--ddp` world whose model was built in an earlier cell, against the same steps in
  `torchddp_launch(N, fn)` from the same kernel (fn builds its model in a fresh group each call);
- nbdistributed (pip install --no-deps nbdistributed): `%dist_init -n N` and the same cells
  (`%%distributed`), in a kernel of its own. Its clean-up path runs `pkill -f` across the machine:
  the kernel's PATH starts with a stand-in `pkill` that only logs, its %dist_shutdown/%dist_reset
  are never called, and its workers are ended by PID at the end.
At the end, every process either kernel started must be gone; a warning names any left.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _kernel import Cell, Kernel, kill, running  # noqa: E402
from _machine import machine  # noqa: E402

BUILD = """\
import torch, torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
torch.manual_seed(0)
model = DDP(nn.Linear(32, 32))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
"""
STEPS = """\
for _ in range(20):
    opt.zero_grad()
    loss = model(torch.randn(16, 32)).pow(2).mean()
    loss.backward()
    opt.step()
"""
LAUNCH_FN = ("import mpify\ndef _bench_fn():\n" + "".join("    " + line + "\n" for line in (BUILD + STEPS).splitlines())
             + "    return float(loss)\n")


class Failed(Exception):
    """A cell the benchmark needs failed: the row says why."""


def need(cell: Cell, what: str) -> Cell:
    if not cell.ok:
        raise Failed(f"{what} failed: {cell.why()}")
    return cell


def med(times: list[float]) -> float:
    return statistics.median(times)


def ms(t: float) -> str:
    return f"{t * 1000:.1f} ms"


def s(t: float) -> str:
    return f"{t:.2f} s"


def bench_mpify(n: int, repeat: int, cells: int) -> tuple[dict, list[str]]:
    """Rows (key -> text) and the problems seen."""
    rows, problems = {}, []
    k = Kernel()
    try:
        need(k.run("%load_ext mpify"), "%load_ext mpify")
        need(k.run("import torch"), "import torch")  # a PyTorch notebook (as bench_launch.py assumes)
        # starts: the first one cold, then warm ones (the forkserver kept), plain and DDP
        first = need(k.run(f"%mpify start {n}"), f"%mpify start {n}")
        rows["start_cold"] = s(first.took)
        need(k.run("%mpify stop"), "%mpify stop")
        for flag, key in (("", "start_warm"), (" --ddp", "start_warm_ddp")):
            starts, stops = [], []
            for i in range(repeat + (1 if flag else 0)):  # the first --ddp start imports torch.distributed
                c = need(k.run(f"%mpify start {n}{flag}"), f"%mpify start {n}{flag}")
                if not (flag and i == 0):
                    starts.append(c.took)
                else:
                    rows["start_first_ddp"] = s(c.took)
                stops.append(need(k.run("%mpify stop"), "%mpify stop").took)
            rows[key] = f"{s(med(starts))} (min {min(starts):.2f}, max {max(starts):.2f})"
            rows[key + "_stop"] = s(med(stops))
        # trivial cells in a DDP world, interleaved with plain cells
        base = {p.pid for p in k.children()}  # the forkserver and the resource tracker, kept on purpose
        need(k.run(f"%mpify start {n} --ddp"), f"%mpify start {n} --ddp")
        world = [p for p in k.children() if p.pid not in base]
        if len(world) != n - 1:
            problems.append(f"{len(world)} new processes after %mpify start {n} --ddp, {n - 1} ranks expected")
        plain, ranch = [], []
        for _ in range(3):  # warm both paths up
            need(k.run("pass"), "pass")
            need(k.run("%%ranch\npass"), "%%ranch pass")
        for _ in range(cells):
            plain.append(need(k.run("pass"), "pass").took)
            ranch.append(need(k.run("%%ranch\npass"), "%%ranch pass").took)
        rows["plain"] = ms(med(plain))
        rows["ranch"] = ms(med(ranch))
        rows["overhead"] = ms(med(ranch) - med(plain))
        rows["cell_spread"] = f"{ms(min(ranch))} .. {ms(max(ranch))}"
        # a rank's output must reach the cell, prefixed
        out = need(k.run("%%ranch\nimport os\nprint('RANK', os.environ['RANK'])"), "%%ranch print")
        for r in range(1, n):
            if f"[rank {r}] RANK {r}" not in out.stdout:
                problems.append(f"rank {r}'s line missing from a %%ranch cell's output: {out.stdout!r}")
        # the DDP loop as a cell, the model built in an earlier cell
        rows["ddp_build"] = s(need(k.run("%%ranch\n" + BUILD), "%%ranch DDP build").took)
        loops = [need(k.run("%%ranch\n" + STEPS), "%%ranch 20 DDP steps").took for _ in range(repeat + 1)]
        rows["ddp_cell_first"] = s(loops[0])
        rows["ddp_cell"] = s(med(loops[1:]))
        need(k.run("%mpify stop"), "%mpify stop")
        time.sleep(1.0)
        ranks_left = [p for p in world if running(p)]
        if ranks_left:
            problems.append(f"after %mpify stop, processes of the world still run: {[p.pid for p in ranks_left]}")
        # the same steps in a launch from the same kernel
        need(k.run(LAUNCH_FN), "defining the launch fn")
        launches = [need(k.run(f"mpify.torchddp_launch({n}, _bench_fn)"), "torchddp_launch").took
                    for _ in range(repeat + 1)]
        rows["ddp_launch_first"] = s(launches[0])
        rows["ddp_launch"] = s(med(launches[1:]))
        rows["ddp_launch_first_s"], rows["ddp_launch_s"] = launches[0], med(launches[1:])
    except Failed as e:
        problems.append(f"mpify: {e}")
    finally:
        k.shutdown()
        left = k.left(5.0)
        if left:
            problems.append(f"mpify: processes left 5 s after the kernel's shutdown: "
                            f"{[(p.pid, ' '.join(p.cmdline())[:60]) for p in left]}")
            kill(left)
        if k.pkill_calls():
            problems.append(f"mpify's kernel ran pkill: {k.pkill_calls()}")
    return rows, problems


def bench_nbdistributed(n: int, repeat: int, cells: int) -> tuple[dict, list[str]]:
    import importlib.util

    if importlib.util.find_spec("nbdistributed") is None:
        return {"why": "not measured: nbdistributed is not installed (pip install --no-deps nbdistributed)"}, []
    rows, problems = {}, []
    k = Kernel()
    try:
        need(k.run("%load_ext nbdistributed"), "%load_ext nbdistributed")
        plain = [need(k.run("pass"), "pass").took for _ in range(cells)]  # before %dist_init sends every cell away
        init = need(k.run(f"%dist_init -n {n}"), f"%dist_init -n {n}")
        if "Successfully started" not in init.stdout:
            raise Failed(f"%dist_init: {init.stdout.strip().splitlines()[-1:]}")
        rows["start"] = s(init.took)
        workers = [p for p in k.children()]
        if len(workers) < n:
            problems.append(f"nbdistributed: {len(workers)} worker processes after %dist_init -n {n}")
        first = k.run("%%distributed\nprint('FIRST', rank)")
        if first.stdout.count("FIRST") < n:
            rows["first_cell_lost"] = True
        dist_cells = []
        for _ in range(3):
            k.run("%%distributed\npass")
        for _ in range(cells):
            dist_cells.append(need(k.run("%%distributed\npass"), "%%distributed pass").took)
        rows["plain"] = ms(med(plain))
        rows["ranch"] = ms(med(dist_cells))
        rows["overhead"] = ms(med(dist_cells) - med(plain))
        rows["cell_spread"] = f"{ms(min(dist_cells))} .. {ms(max(dist_cells))}"
        build = k.run("%%distributed\n" + BUILD + "print('BUILT', rank)")
        if build.stdout.count("BUILT") < n:
            raise Failed(f"DDP build cell: {build.why()} {build.stdout[-200:]!r}")
        rows["ddp_build"] = s(build.took)
        loops = []
        for _ in range(repeat + 1):
            c = k.run("%%distributed\n" + STEPS + "print('DONE', rank)")
            if c.stdout.count("DONE") < n:
                raise Failed(f"DDP steps cell: {c.why()} {c.stdout[-200:]!r}")
            loops.append(c.took)
        rows["ddp_cell_first"] = s(loops[0])
        rows["ddp_cell"] = s(med(loops[1:]))
    except Failed as e:
        problems.append(f"nbdistributed: {e}")
        rows.setdefault("why", f"not measured: {e}"[:80])
    except Exception as e:  # a timeout on iopub, a kernel that died
        problems.append(f"nbdistributed: {type(e).__name__}: {e}")
        rows.setdefault("why", f"not measured: {type(e).__name__}: {e}"[:80])
    finally:
        k.shutdown(kill_children=True)  # its workers would outlive the kernel: ended by PID
        left = k.left(5.0)
        if left:
            problems.append(f"nbdistributed: processes left after ending them by PID: {[p.pid for p in left]}")
            kill(left)
        if k.pkill_calls():
            problems.append(f"nbdistributed's kernel ran the stand-in pkill (nothing killed): {k.pkill_calls()}")
    return rows, problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--nprocs", type=int, default=4, help="ranks, the kernel included (default 4)")
    ap.add_argument("--repeat", type=int, default=5, help="warm starts and DDP loops measured (default 5)")
    ap.add_argument("--cells", type=int, default=30, help="trivial cells of each kind (default 30)")
    ap.add_argument("--no-peer", action="store_true", help="leave nbdistributed out")
    a = ap.parse_args()
    load0 = os.getloadavg()
    t0 = time.monotonic()
    mine, problems = bench_mpify(a.nprocs, a.repeat, a.cells)
    if a.no_peer:
        peer = {"why": "not measured (--no-peer)"}
    else:
        peer, more = bench_nbdistributed(a.nprocs, a.repeat, a.cells)
        problems += more
    load1 = os.getloadavg()
    n = a.nprocs

    def cell(rows: dict, key: str) -> str:
        if key in rows:
            return rows[key]
        return rows.get("why", "-") if key in ("start", "ranch") else "-"

    table = [
        (f"trivial cell on {n} ranks (`%%ranch` / `%%distributed` `pass`), round trip", cell(mine, "ranch"),
         cell(peer, "ranch"), ""),
        ("plain cell `pass` in the same kernel, round trip", cell(mine, "plain"), cell(peer, "plain"), ""),
        ("**overhead of the trivial cell over a plain cell**", cell(mine, "overhead"), cell(peer, "overhead"),
         "<= 20 ms"),
        ("trivial cell, min .. max", cell(mine, "cell_spread"), cell(peer, "cell_spread"), ""),
        (f"`%mpify start {n}`, first in the kernel (cold) / `%dist_init -n {n}`", cell(mine, "start_cold"),
         cell(peer, "start"), ""),
        (f"**`%mpify start {n}`, warm** (median of {a.repeat})", cell(mine, "start_warm"), "", "<= 0.5 s"),
        (f"`%mpify start {n} --ddp`, first", cell(mine, "start_first_ddp"), "", ""),
        (f"**`%mpify start {n} --ddp`, warm** (median of {a.repeat})", cell(mine, "start_warm_ddp"), "",
         "<= 0.5 s"),
        ("`%mpify stop` (plain / --ddp world)", f"{cell(mine, 'start_warm_stop')} / {cell(mine, 'start_warm_ddp_stop')}",
         "", ""),
        ("cell building DDP(nn.Linear(32, 32)) + SGD on every rank", cell(mine, "ddp_build"), cell(peer, "ddp_build"), ""),
        ("20 DDP steps as a cell, first", cell(mine, "ddp_cell_first"), cell(peer, "ddp_cell_first"), ""),
        (f"**20 DDP steps as a cell** (median of {a.repeat})", cell(mine, "ddp_cell"), cell(peer, "ddp_cell"), ""),
        ("`torchddp_launch(N, fn)`: group + DDP + 20 steps, first", cell(mine, "ddp_launch_first"), "", ""),
        (f"**`torchddp_launch(N, fn)`: group + DDP + 20 steps** (median of {a.repeat})", cell(mine, "ddp_launch"),
         "", ""),
    ]
    print(f"\nA live world, N={n}: Jupyter round trips (execute request -> idle), medians; "
          f"{a.cells} trivial cells of each kind, {a.repeat} warm starts and loops")
    print(f"machine: {machine()}")
    print(f"load average (1/5/15 min): {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f} at start, "
          f"{load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f} at end; {time.monotonic() - t0:.0f} s in all\n")
    print("| what | mpify | nbdistributed | goal |")
    print("|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    print("\nThe cold start includes the forkserver's start (torch and torch._dynamo preloaded); the DDP build cell "
          "pays rank 0's own first DDP construction (the kernel imports torch._dynamo and sympy). "
          "mpify's DDP ranks run one intra-op thread each (TorchDDPCtx's num_threads=1); nbdistributed's workers "
          f"keep torch's default (one per core: {n} workers x {os.cpu_count()} threads here), which likely accounts "
          "for much of its slower DDP steps on a small machine (not isolated here).")
    if "ddp_launch_first_s" in mine and mine["ddp_launch_first_s"] > 5 * mine["ddp_launch_s"]:
        print(f"The first torchddp_launch after the world took {mine['ddp_launch_first_s']:.1f} s: the forkserver was "
              "started again (with mpify at be19a32, World puts TORCH_DIST_INIT_BARRIER=1 in the caller's "
              "environment before it asks for the forkserver, and TORCH_* variables are part of the forkserver's "
              "signature, so every switch between a World and a launch restarts it).")
    if peer.get("first_cell_lost"):
        print("\nnbdistributed: the first `%%distributed` cell after `%dist_init` did not reach every rank.")
    if problems:
        print("\nProblems seen:")
        for p in problems:
            print(f"- {p}")
    else:
        print("\nNo process left behind; no problem seen.")


if __name__ == "__main__":
    main()
