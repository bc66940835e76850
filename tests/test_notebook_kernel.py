"""ranch inside a real Jupyter kernel (nbclient + ipykernel): the kernel is rank 0, cells' own
functions, lambdas and classes travel to the ranks, rank output lands in the launching cell.
The notebooks run in the session's shared kernel (conftest.SharedKernel), one after another."""
import re

import nbformat
from nbformat.v4 import new_code_cell, new_notebook

from helpers import described, strays

CELLS = [
    "import os\nfrom mpify import ranch",
    "def work(x):\n    r = int(os.environ['RANK'])\n    print(f'hello from {r}')\n    return scale(x) + Point(r, 1).total()",
    "scale = lambda v: v * 10",
    "class Point:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\n    def total(self):\n        return self.a + self.b",
    "result = ranch(3, work, 2, gather=True)\nresult",
    "def boom():\n    if os.environ['RANK'] == '2':\n        raise ValueError('rank 2 says no')\n    return 1\nranch(3, boom)",
    "ranch(2, work, 1)",
]


def texts(cell, name="stdout"):
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == name)


def test_notebook_cells_run_on_three_ranks(shared_kernel, kernel_name, tmp_path):
    nb = new_notebook(cells=[new_code_cell(src) for src in CELLS])
    nb.metadata["kernelspec"] = {"name": kernel_name, "display_name": "mpify test", "language": "python"}
    shared_kernel.run(nb, tmp_path)
    nbformat.write(nb, tmp_path / "executed.ipynb")

    launch = nb.cells[4]
    lines = texts(launch).splitlines()
    assert "hello from 0" in lines  # rank 0 is the kernel itself: no prefix
    assert "[rank 1] hello from 1" in lines and "[rank 2] hello from 2" in lines
    result = [o for o in launch.outputs if o.output_type == "execute_result"]
    assert result and result[0]["data"]["text/plain"] == "[21, 22, 23]"

    errors = [o for o in nb.cells[5].outputs if o.output_type == "error"]
    assert len(errors) == 1
    assert errors[0].ename == "ValueError" and errors[0].evalue == "rank 2 says no"
    assert any("rank 2" in line for line in errors[0].traceback)

    # After a failed launch the kernel launches again as usual.
    again = [o for o in nb.cells[6].outputs if o.output_type == "execute_result"]
    assert again and again[0]["data"]["text/plain"] == "11"
    assert "[rank 1] hello from 1" in texts(nb.cells[6])
    assert not strays(), described(strays())


BIG_CELLS = [
    "import os, numpy as np, torch\nfrom mpify import ranch\nfrom mpify.engine.args import shm",
    "data = torch.arange(8 << 20, dtype=torch.float32)  # 32 MB\nlabels = np.zeros(8 << 20, dtype=np.int64)  # 64 MB",
    "def peek(x, y):\n    return float(x[-1]), int(y[123456])",
    "first = ranch(3, peek, data, labels, gather=True)",
    "data[-1] = -1.0\nlabels[123456] = 7\nsecond = ranch(3, peek, data, labels, gather=True)",
    "from mpify.engine.args.writewatch import WriteWatch  # where the kernel cannot watch, all is copied\n"
    "print(first, second, WriteWatch.open() is None or shm.last_launch['copied'] < (1 << 20))",
]


def test_big_arguments_passed_again_from_a_kernel(shared_kernel, kernel_name, tmp_path):
    # The kernel is rank 0 and changes its data between launches: the ranks follow, and the
    # second launch copies only the written pages.
    nb = new_notebook(cells=[new_code_cell(src) for src in BIG_CELLS])
    nb.metadata["kernelspec"] = {"name": kernel_name, "display_name": "mpify test", "language": "python"}
    shared_kernel.run(nb, tmp_path)
    want = [(float((8 << 20) - 1), 0)] * 3, [(-1.0, 7)] * 3
    assert texts(nb.cells[5]).strip() == f"{want[0]} {want[1]} True"
    assert not strays(), described(strays())


ASYNC_CELLS = [
    "import asyncio, os\nfrom mpify import ranch",
    "async def rank_later():\n    await asyncio.sleep(0.05)\n    return int(os.environ['RANK'])",
    "print(ranch(3, rank_later, gather=True))",
]


def test_async_function_from_a_kernel(shared_kernel, kernel_name, tmp_path):
    # The kernel's thread runs an event loop already: rank 0's coroutine gets a loop of its own.
    nb = new_notebook(cells=[new_code_cell(src) for src in ASYNC_CELLS])
    nb.metadata["kernelspec"] = {"name": kernel_name, "display_name": "mpify test", "language": "python"}
    shared_kernel.run(nb, tmp_path)
    assert texts(nb.cells[2]).strip() == "[0, 1, 2]"
    assert not strays(), described(strays())


FLOOD = """import os, re
from mpify import ranch

def flood(n=300):
    from IPython.display import display
    if os.environ["RANK"] != "0":  # rank 0 is the kernel: its displays are the user's own
        for i in range(n):
            display({"text/html": f"<b>{i}</b>", "text/plain": str(i)}, raw=True)
    return n

ranch(2, flood)"""


def test_a_rank_displaying_in_a_tight_loop_cannot_flood_the_cell(shared_kernel, kernel_name, tmp_path):
    """300 displays from rank 1 in well under a second: a burst reaches the cell, the rest are
    counted in one line of rank 1's (engine/output/lines.py's RICH_* limits)."""
    from mpify.engine.output.lines import RICH_BURST, RICH_PER_SECOND

    nb = new_notebook(cells=[new_code_cell(FLOOD)])
    nb.metadata["kernelspec"] = {"name": kernel_name, "display_name": "mpify test", "language": "python"}
    shared_kernel.run(nb, tmp_path)
    outputs = nb.cells[0].outputs
    assert not [o for o in outputs if o.output_type == "error"], outputs
    shown = [o for o in outputs if o.output_type == "display_data" and o.metadata.get("mpify", {}).get("rank") == 1]
    assert RICH_BURST <= len(shown) <= RICH_BURST + 2 * RICH_PER_SECOND, len(shown)
    assert [o.data["text/plain"] for o in shown[:3]] == ["[rank 1] 0", "[rank 1] 1", "[rank 1] 2"]
    note = re.search(r"\[rank 1\] \((\d+) displays left out: at most 5 a second", texts(nb.cells[0]))
    assert note and int(note[1]) + len(shown) == 300, texts(nb.cells[0])
