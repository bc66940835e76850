"""Live progress bars of the child ranks: a tqdm bar in ranks 1..N-1 shows as it is redrawn, in a
Jupyter cell (one display per rank, updated in place), in a terminal (one line per rank kept at the
bottom), in a live world's `%%ranch` cell; a pipe gets whole lines, the final frame only."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from export_helpers import MPIFY, env_with_tmp, wait_session_gone

WORK = '''import sys, time
from tqdm import tqdm


def work(steps: int = 30):
    for _ in tqdm(range(steps), file=sys.stderr):
        time.sleep(0.1)
    return "done"
'''

FRAME = re.compile(r"\[rank (\d+)\] +(\d+)%")


def frames(text: str) -> list[tuple[int, int]]:
    """(rank, percent) of every child-rank bar frame in `text`."""
    return [(int(r), int(p)) for r, p in FRAME.findall(text)]


# ---- Jupyter: a launch and a live world in one real kernel (nbclient) --------------------------------

@pytest.fixture(scope="module")
def executed(kernel_name, tmp_path_factory):
    """One notebook run in a real kernel: a 3-rank launch of a 3 s tqdm loop, then the same loop in a
    live world's %%ranch cell. Every iopub message of each cell is kept with the time it arrived."""
    from nbclient import NotebookClient

    seen: dict[int, list] = {}

    class Recording(NotebookClient):
        def process_message(self, msg, cell, cell_index):
            seen.setdefault(cell_index, []).append((time.monotonic(), msg))
            return super().process_message(msg, cell, cell_index)

    nb = new_notebook(cells=[
        new_code_cell(WORK + "import mpify"),
        new_code_cell("mpify.ranch(3, work)\nprint('LAUNCH-DONE')"),
        new_code_cell("%load_ext mpify\n%mpify start 3"),
        new_code_cell("%%ranch\nimport sys, time\nfrom tqdm import tqdm\n"
                      "for _ in tqdm(range(30), file=sys.stderr):\n    time.sleep(0.1)"),
        new_code_cell("%mpify stop"),
    ])
    cwd = tmp_path_factory.mktemp("bars-nb")
    client = Recording(nb, kernel_name=kernel_name, timeout=120, allow_errors=True,
                       resources={"metadata": {"path": str(cwd)}})
    client.execute()
    for cell in nb.cells:
        errors = [o for o in cell.get("outputs", []) if o.output_type == "error"]
        assert not errors, errors
    return nb, seen


def bar_messages(msgs: list) -> list[tuple[float, str, str]]:
    """(arrival, msg_type, text/plain) of the cell's display messages."""
    return [(t, m["msg_type"], m["content"]["data"].get("text/plain", ""))
            for t, m in msgs if m["msg_type"] in ("display_data", "update_display_data")]


def assert_live(msgs: list, before: float) -> None:
    """Each child rank's bar reached the cell as several distinct frames before `before`, every
    display message under the cell's own request (published from mpify's supervisor thread)."""
    assert len({m["parent_header"]["msg_id"] for _, m in msgs}) == 1
    early = [(r, p) for t, _, text in bar_messages(msgs) if t < before for r, p in frames(text)]
    for rank in (1, 2):
        middle = {p for r, p in early if r == rank and 0 < p < 100}
        assert len(middle) >= 3, (rank, sorted(middle), early)


def test_jupyter_launch_shows_every_rank_bar_live_and_keeps_the_final_frame(executed):
    nb, seen = executed
    msgs = seen[1]
    marker = next(t for t, m in msgs if m["msg_type"] == "stream" and "LAUNCH-DONE" in m["content"]["text"])
    assert_live(msgs, marker)
    # A few frames a second per rank (4 at most, by the kernel's send times), never a backlog.
    for rank in (1, 2):
        sent = [m["header"]["date"] for _, m in msgs if m["msg_type"] in ("display_data", "update_display_data")
                and m["content"]["data"]["text/plain"].startswith(f"[rank {rank}] ")]
        span = (sent[-1] - sent[0]).total_seconds()
        assert len(sent) <= span / 0.25 + 2, (rank, len(sent), span)
    # As saved: one display per child rank, holding its final frame; the bar's frames are not
    # repeated as stream text.
    outputs = nb.cells[1].outputs
    shown = [o.data["text/plain"] for o in outputs if o.output_type == "display_data"]
    for rank in (1, 2):
        finals = [s for s in shown if s.startswith(f"[rank {rank}] ")]
        assert len(finals) == 1 and "100%" in finals[0] and "30/30" in finals[0], shown
    streams = "".join(o.text for o in outputs if o.output_type == "stream")
    assert "[rank 1]" not in streams and "[rank 2]" not in streams, streams
    assert "LAUNCH-DONE" in streams


def test_world_ranch_cell_shows_child_bars_live(executed):
    nb, seen = executed
    msgs = seen[3]
    idle = next(t for t, m in msgs if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle")
    assert_live(msgs, idle - 0.5)
    shown = [o.data["text/plain"] for o in nb.cells[3].outputs if o.output_type == "display_data"]
    for rank in (1, 2):
        finals = [s for s in shown if s.startswith(f"[rank {rank}] ")]
        assert len(finals) == 1 and "100%" in finals[0], shown


# ---- a fresh kernel's first launch and first world: ranks forked from the kernel itself ------------

FIRST_LAUNCH = """import json, os, sys, time, psutil
from tqdm.auto import tqdm  # the notebook's usual bar: a widget in the kernel, text in a rank
from mpify import ranch


def work(steps: int = 30):
    for _ in tqdm(range(steps)):
        time.sleep(0.1)
    from IPython import get_ipython
    return hasattr(sys, "ps1"), type(get_ipython()).__name__, psutil.Process(os.getppid()).cmdline()


seen = ranch(3, work, gather=True)
print("SEEN", json.dumps(seen[1:]))
print("LAUNCH-DONE")"""

FIRST_WORLD = """%load_ext mpify
%mpify start 3"""

WORLD_BAR = """%%ranch
import os, sys, time, psutil
from tqdm.auto import tqdm
from IPython import get_ipython
for _ in tqdm(range(30)):
    time.sleep(0.1)
if os.environ["RANK"] != "0":
    print("SEEN", hasattr(sys, "ps1"), type(get_ipython()).__name__)"""


def run_recorded(kernel_name, cells: list[str], cwd) -> tuple:
    """A fresh kernel runs `cells`; every iopub message of each cell kept with its arrival time."""
    from nbclient import NotebookClient

    seen: dict[int, list] = {}

    class Recording(NotebookClient):
        def process_message(self, msg, cell, cell_index):
            seen.setdefault(cell_index, []).append((time.monotonic(), msg))
            return super().process_message(msg, cell, cell_index)

    nb = new_notebook(cells=[new_code_cell(c) for c in cells])
    Recording(nb, kernel_name=kernel_name, timeout=120, allow_errors=True,
              resources={"metadata": {"path": str(cwd)}}).execute()
    for cell in nb.cells:
        errors = [o for o in cell.get("outputs", []) if o.output_type == "error"]
        assert not errors, errors
    return nb, seen


def test_a_fresh_kernels_first_launch_shows_every_rank_bar_from_ranks_without_a_shell(kernel_name, tmp_path):
    """The first launch, in the same cell as `from mpify import ranch`, is served by the kernel
    forked (no forkserver is ready yet): its ranks are plain processes all the same (engine/rank/plain.py),
    so tqdm.auto is a text bar there, shown live in the cell."""
    nb, seen = run_recorded(kernel_name, [FIRST_LAUNCH], tmp_path)
    msgs = seen[0]
    done = next(t for t, m in msgs if m["msg_type"] == "stream" and "LAUNCH-DONE" in m["content"]["text"])
    assert_live(msgs, done)
    out = "".join(o.text for o in nb.cells[0].outputs if o.output_type == "stream" and o.name == "stdout")
    ranks = json.loads(out.split("SEEN ", 1)[1].splitlines()[0])
    for ps1, shell, parent in ranks:
        assert (ps1, shell) == (False, "NoneType"), ranks
        assert "ipykernel_launcher" in " ".join(parent), parent  # forked from the kernel (the zygote)
    stderr = "".join(o.text for o in nb.cells[0].outputs if o.output_type == "stream" and o.name == "stderr")
    assert "send message from fork" not in stderr and "[rank 1]" not in stderr, stderr[-2000:]


NOTEBOOK_BAR = """%%ranch
from tqdm.notebook import trange  # a widget bar, asked for by name: text in a rank
for _ in trange(5, desc="widget"):
    time.sleep(0.05)"""


def test_a_world_started_in_a_fresh_kernels_first_cell_shows_every_rank_bar(kernel_name, tmp_path):
    nb, seen = run_recorded(kernel_name, [FIRST_WORLD, WORLD_BAR, NOTEBOOK_BAR, "%mpify stop"], tmp_path)
    msgs = seen[1]
    idle = next(t for t, m in msgs if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle")
    assert_live(msgs, idle - 0.5)
    out = "".join(o.text for o in nb.cells[1].outputs if o.output_type == "stream" and o.name == "stdout")
    for rank in (1, 2):
        assert f"[rank {rank}] SEEN False NoneType" in out, out
    shown = [o.data["text/plain"] for o in nb.cells[2].outputs if o.output_type == "display_data"]
    for rank in (1, 2):
        assert any(s.startswith(f"[rank {rank}] widget: 100%") for s in shown), shown


# ---- the terminal and the pipe: `mpify run` ----------------------------------------------------------

@pytest.fixture(scope="module")
def notebook(tmp_path_factory):
    d = tmp_path_factory.mktemp("bars-cli")
    path = d / "bars.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell(WORK)]), str(path))
    return str(path)


def emulate(data: str, cols: int) -> list[str]:
    """The screen a terminal shows after `data`: printable text, CR, LF, and the escapes mpify
    writes (cursor up, erase to the end of the screen / of the line). Lines that scrolled away are
    kept (the terminal's scrollback)."""
    rows: list[list[str]] = [[]]
    row = col = 0
    i = 0
    while i < len(data):
        ch = data[i]
        if ch == "\x1b":
            m = re.compile(r"\x1b\[(\d*)([A-Za-z])").match(data, i)
            assert m, repr(data[i:i + 10])
            n, op = int(m.group(1) or 1), m.group(2)
            if op == "A":
                row = max(0, row - n)
            elif op == "J":
                del rows[row + 1:]
                del rows[row][col:]
            elif op == "K":
                del rows[row][col:]
            else:
                raise AssertionError(f"unexpected escape {m.group(0)!r}")
            i = m.end()
            continue
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row += 1
            while len(rows) <= row:
                rows.append([])
        else:
            if col >= cols:  # autowrap
                row, col = row + 1, 0
                while len(rows) <= row:
                    rows.append([])
            line = rows[row]
            while len(line) < col:
                line.append(" ")
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
        i += 1
    return ["".join(r).rstrip() for r in rows]


def test_terminal_run_redraws_every_rank_bar_at_the_bottom(notebook, tmp_path):
    cols = 110
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
    env = env_with_tmp(tmp_path)
    env["TERM"] = "xterm"
    p = subprocess.Popen([MPIFY, "run", notebook, "--fn", "work", "-n", "3"], stdin=slave, stdout=slave,
                         stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    chunks, exited = [], None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if exited is None and p.poll() is not None:
                exited = time.monotonic()
            if select.select([master], [], [], 0.2)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every holder of the terminal is gone
                    break
                if not data:
                    break
                chunks.append((time.monotonic(), data))
            elif exited is not None:
                break
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
        p.wait()
    exited = exited or time.monotonic()
    assert not wait_session_gone(p.pid)
    text = b"".join(d for _, d in chunks).decode("utf-8", "replace")
    assert p.returncode == 0, text[-3000:]
    # Intermediate frames of ranks 1 and 2 were on the terminal while the ranks ran.
    early = [(r, pct) for t, d in chunks if t < exited - 0.5 for r, pct in frames(d.decode("utf-8", "replace"))]
    for rank in (1, 2):
        middle = {pct for r, pct in early if r == rank and 0 < pct < 100}
        assert len(middle) >= 3, (rank, sorted(middle))
    # The final screen (scrollback included): each child rank's last frame once, as a line of its own.
    screen = emulate(text, cols)
    for rank in (1, 2):
        mine = [line for line in screen if f"[rank {rank}]" in line]
        assert len(mine) == 1 and "100%" in mine[0] and "30/30" in mine[0], screen
        assert mine[0].startswith(f"[rank {rank}] "), mine
    assert screen[-1] == "'done'" or screen[-2] == "'done'", screen[-5:]


def test_pipe_gets_whole_lines_with_the_final_frame_only(notebook, tmp_path):
    p = subprocess.run([MPIFY, "run", notebook, "--fn", "work", "-n", "3", "--", "--steps", "8"],
                       capture_output=True, text=True, env=env_with_tmp(tmp_path), timeout=120,
                       start_new_session=True)
    assert p.returncode == 0, p.stderr
    both = p.stdout + p.stderr
    assert "\x1b" not in both
    for rank in (1, 2):
        # From the prefix to the line's end (rank 0's own bar, on the same stream, is tqdm's as ever).
        mine = re.findall(rf"\[rank {rank}\][^\n]*", both)
        assert len(mine) == 1, mine
        assert "\r" not in mine[0] and mine[0].startswith(f"[rank {rank}] 100%") and "8/8" in mine[0], mine
    assert p.stdout.splitlines()[-1] == "'done'"


def test_terminal_rank_lines_and_bars_go_above_the_callers_open_line():
    """The gate on a real terminal device: a rank's line arriving while the caller's own line is
    open goes above it at once; a bar sits between the finished lines and the open one; a line the
    caller ends goes above the bar; a bar whose line ends stays as an ordinary line."""
    from mpify.engine.output.bars import TerminalBars
    from mpify.engine.output.lines import LineGate

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    tty = open(slave, "w", encoding="utf-8", closefd=True)
    try:
        bars = TerminalBars(tty)
        gate = LineGate(tty, bars)
        steps = [
            lambda: gate.write("abc"),
            lambda: gate.write_lines("[rank 1] hi\n"),
            lambda: bars.frame((1, "stderr"), "[rank 1]  50%|#####     |"),
            lambda: gate.write("\r 10%"),
            lambda: gate.write("\r 20%\n"),
            lambda: bars.end((1, "stderr"), "[rank 1] 100%|##########|"),
            lambda: gate.write("done\n"),
        ]
        screens, seen = [], b""
        for step in steps:
            step()
            while select.select([master], [], [], 0.05)[0]:
                seen += os.read(master, 65536)
            screens.append([line for line in emulate(seen.decode(), 80) if line])
    finally:
        tty.close()
        os.close(master)
    assert screens[1] == ["[rank 1] hi", "abc"]
    assert screens[2] == ["[rank 1] hi", "[rank 1]  50%|#####     |", "abc"]
    assert screens[3] == ["[rank 1] hi", "[rank 1]  50%|#####     |", " 10%"]
    assert screens[4] == ["[rank 1] hi", " 20%", "[rank 1]  50%|#####     |"]
    assert screens[6] == ["[rank 1] hi", " 20%", "[rank 1] 100%|##########|", "done"]
