"""fastai, run from a real Jupyter kernel as a user runs it (tests/test_frameworks.py's way): a
`Learner` trained under `learn.distrib_ctx()` in `ranch` three launches in a row, and in a live
world (a model cell, then two training cells on the same model). fastai's `distrib_ctx` hands the
model to accelerate, which joins the ranks' environment (RANK, WORLD_SIZE, MASTER_ADDR...) and
makes the process group itself; fastai splits each batch's indices between the ranks.

fastai is installed without its dependencies (.ci/run: its requirements name torchvision, which
cannot import beside the CPU torch here); the modules used below never import torchvision.
"""
from __future__ import annotations

import pytest
from nbformat.v4 import new_code_cell, new_notebook

from conftest import run_notebook
from test_frameworks import COMMON, check, everything, results, same_training, text, world_cells

pytest.importorskip("torch")
pytest.importorskip("fastai")

FASTAI = r'''
from fastai.basics import DataLoaders, Learner, MSELossFlat, nn, set_seed
from fastai.distributed import DistributedDL  # also adds Learner.distrib_ctx
from torch.utils.data import TensorDataset

def fastai_train(model=None, tag="fastai"):
    # fastai 2.8.12's DistributedDL._broadcast sends the shuffled indices from rank 0 as
    # `LongTensor(t).cuda()`: its code assumes CUDA and nccl, and fails on a CPU-only torch
    # ("Torch not compiled with CUDA enabled"). gloo broadcasts CPU tensors: the same on the CPU.
    def _broadcast_cpu(self, t, rank):
        t = torch.tensor(t, dtype=torch.long)
        dist.broadcast(t, rank)
        return t.tolist()
    DistributedDL._broadcast = _broadcast_cpu

    set_seed(0)  # python's random too: fastai's DataLoader shuffles with it
    x, y = data(32)
    # 32 rows, batches of 4, split between 2 ranks by fastai's DistributedDL: 4 training batches a
    # rank (8 if it did not split them)
    dls = DataLoaders.from_dsets(TensorDataset(x, y), TensorDataset(*data(16)), bs=4, device="cpu")
    learn = Learner(dls, model or nn.Linear(4, 1), loss_func=MSELossFlat())
    # cpu=True goes to accelerate's Accelerator: on a machine without a GPU accelerate otherwise
    # sees no distributed job (DistributedType.NO) and leaves the model unwrapped.
    with learn.distrib_ctx(cpu=True):
        learn.fit(1, 1e-2)
        report(tag, world=dist.get_world_size(), losses=[float(v) for v in learn.recorder.losses],
               valid=float(learn.recorder.values[-1][1]), same=same_everywhere(learn.model))
'''

FASTAI_RUNS = r'''
fastai_runs = [ranch(2, fastai_train) for _ in range(3)]
'''

WORLD = world_cells("", FASTAI, "nn.Linear(4, 1)", "fastai_train(model, tag='fastai-world')")
CELLS = [COMMON, FASTAI, FASTAI_RUNS, "%load_ext mpify", *WORLD]


@pytest.fixture(scope="module")
def executed(kernel_name, tmp_path_factory):
    nb = new_notebook(cells=[new_code_cell(c) for c in CELLS])
    run_notebook(nb, kernel_name, cwd=tmp_path_factory.mktemp("fastai"), timeout=240)
    for i, cell in enumerate(nb.cells):
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, (i, cell.source[:200], [(e.ename, e.evalue, "\n".join(e.traceback)[-3000:]) for e in errors])
    return nb


def test_fastai_distrib_ctx_three_launches_and_a_world(executed):
    runs = check(executed, "fastai", 3)
    same_training(runs)
    world = check(executed, "fastai-world", 2)
    # the second training cell went on from the first one's weights
    assert world[0][0]["losses"] != world[1][0]["losses"]


def tables(cell) -> list[str]:
    """fastprogress's results table (epoch, train_loss, valid_loss, time) as the cell holds it."""
    return [o.data["text/html"] for o in cell.outputs if o.output_type == "display_data"
            and '<table class="fastprogress">' in o.data.get("text/html", "")]


def test_fastai_progress_of_rank_0_reaches_the_cell(executed):
    """Rank 0 is the kernel: fastai's own notebook display (fastprogress's HTML bar, then its table
    of the epoch) reaches the cell as in a plain notebook, once a launch; fastai silences the other
    ranks' (distrib_ctx removes their ProgressCallback), so nothing of rank 1's is shown."""
    header = "<th>epoch</th><th>train_loss</th><th>valid_loss</th><th>time</th>"
    for tag, marker, launches in (("fastai", "fastai_runs = ", 3), ("fastai-world", "%%ranch\nfastai_train(", 2)):
        cells = [c for c in executed.cells if marker in c.source]
        shown = [t for c in cells for t in tables(c)]
        assert len(shown) == launches and all(header in t for t in shown), [everything(c)[-2000:] for c in cells]
        # each table's train_loss is rank 0's last recorded (smoothed) loss, as fastprogress prints it
        for table, ranks in zip(shown, results(executed, tag)):
            assert f"<td>0</td><td>{ranks[0]['losses'][-1]:.6f}</td>" in table, (table, ranks[0])
        for c in cells:
            assert not [o for o in c.outputs if o.get("metadata", {}).get("mpify", {}).get("rank") == 1], c.outputs
            assert all("RESULT" in line for line in text(c).splitlines() if line.startswith("[rank 1]")), text(c)
