"""The training frameworks users bring, run from a real Jupyter kernel as a user runs them: each in
`ranch` three launches in a row (the kernel is rank 0 of every launch, so what a framework keeps
process-wide must not break the next one: engine/rank/frameworks.py), and in a live world (a model
cell, then two training cells on the same model).

One kernel runs one notebook of every framework (its imports are paid once, its forkserver is
shared); 2 ranks, tiny models, a few steps. Every training cell prints, on every rank, one
`RESULT <json>` line of what the rank saw; the tests read those lines from the saved notebook
(rank 1's arrive as `[rank 1] RESULT ...`).
"""
from __future__ import annotations

import json
import os
import re

import pytest
from nbformat.v4 import new_code_cell, new_notebook

from conftest import run_notebook

pytest.importorskip("torch")

COMMON = r'''
import json, os
import torch
import torch.distributed as dist
from mpify import ranch, torchddp_launch

def same_everywhere(module):
    """Whether the weights are equal on every rank (all-gathered)."""
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    every = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(every, flat)
    return all(torch.equal(every[0], t) for t in every)

def data(n=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return x, x.sum(1, keepdim=True)

def report(tag, **seen):
    print("RESULT", json.dumps(dict(tag=tag, rank=int(os.environ.get("RANK", 0)), **seen)), flush=True)
'''

LIGHTNING = r'''
import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only

class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.losses = []
    def training_step(self, batch, i):
        loss = torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
        self.losses.append(loss.item())
        return loss
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

def lightning_fit(strategy, model=None, tag="lightning"):
    torch.manual_seed(0)
    model = model or Tiny()
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data()), batch_size=4)
    trainer.fit(model, loader)
    report(tag, world=trainer.world_size, losses=model.losses[-4:], same=same_everywhere(model),
           strategy=type(trainer.strategy).__name__)
    return trainer.global_rank
'''

LIGHTNING_RUNS = r'''
lightning_runs = [torchddp_launch(2, lightning_fit, "ddp"),  # TorchDDPCtx made the group
                  ranch(2, lightning_fit, "ddp"),            # Lightning made it
                  ranch(2, lightning_fit, "ddp", caller_rank=1)]  # the kernel runs rank 1
auto_runs = [ranch(2, lightning_fit, "auto", tag="lightning-auto") for _ in range(3)]
print("AFTER", json.dumps({"lightning": lightning_runs + auto_runs, "rank_zero_only.rank": rank_zero_only.rank}))
'''

HF = r'''
import tempfile
from transformers import Trainer, TrainingArguments

class Regressor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}

class Rows(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = data()
    def __len__(self):
        return len(self.x)
    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}

def hf_train(out, model=None, tag="hf"):
    torch.manual_seed(0)
    model = model or Regressor()
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=4, learning_rate=0.05,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, ddp_backend="gloo")
    trainer = Trainer(model=model, args=args, train_dataset=Rows())
    trainer.train()
    report(tag, world=args.world_size, losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
           same=same_everywhere(model))

hf_out = tempfile.mkdtemp()
'''

HF_RUNS = r'''
hf_runs = [torchddp_launch(2, hf_train, hf_out), ranch(2, hf_train, hf_out), ranch(2, hf_train, hf_out)]
'''

ACCELERATE = r'''
from accelerate import Accelerator
from accelerate.state import PartialState
from tqdm.auto import tqdm

def accelerate_train(model=None, tag="accelerate"):
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = model or torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data()), batch_size=4)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    losses = []
    for xb, yb in tqdm(loader, desc="accelerate"):  # every rank's bar, as a user's loop has it
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    report(tag, world=accelerator.num_processes, losses=losses,
           same=same_everywhere(accelerator.unwrap_model(model)))
'''

ACCELERATE_RUNS = r'''
# The notebook's own single-process Accelerator, made before any launch: it must neither leak
# into the launches nor be lost after them.
mine = Accelerator(cpu=True)
accelerate_runs = [torchddp_launch(2, accelerate_train), ranch(2, accelerate_train), ranch(2, accelerate_train)]
print("AFTER", json.dumps({"accelerate": [mine.num_processes, str(PartialState().distributed_type)]}))
'''

IGNITE = r'''
import ignite.distributed as idist
from ignite.engine import Engine, Events

def ignite_train(model=None, tag="ignite"):
    def training(local_rank, config):
        torch.manual_seed(0)
        net = idist.auto_model(config["model"] or torch.nn.Linear(4, 1))
        opt = idist.auto_optim(torch.optim.SGD(net.parameters(), lr=0.05))
        loader = idist.auto_dataloader(torch.utils.data.TensorDataset(*data()), batch_size=8, shuffle=False)  # 4 a rank
        losses = []
        def step(engine, batch):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(batch[0]), batch[1])
            loss.backward()
            opt.step()
            losses.append(loss.item())
            return loss.item()
        trainer = Engine(step)
        trainer.run(loader, max_epochs=1)
        report(tag, world=idist.get_world_size(), losses=losses, same=same_everywhere(net),
               backend=idist.backend(), parallel_made=idist.model_name())
    # No nproc_per_node: ignite joins the ranks' environment (RANK, WORLD_SIZE...), spawns nothing.
    with idist.Parallel(backend="gloo") as parallel:
        parallel.run(training, {"model": model})
'''

IGNITE_RUNS = r'''
ignite_runs = [ranch(2, ignite_train) for _ in range(3)]
'''

RICH = r'''
import pandas as pd
import matplotlib.pyplot as plt

def show_shard():
    rank = int(os.environ["RANK"])
    display(pd.DataFrame({"rank": [rank] * 3, "x": range(3)}))
    plt.plot([0, 1, 2], [rank, rank + 1, rank * 2])
    plt.title(f"rank {rank}")
    plt.show()

'''

RICH_RUNS = "ranch(2, show_shard)"


def world_cells(start: str, defs: str, model: str, train: str) -> list[str]:
    """A live world: the notebook's definitions run on every rank and a model made (the model
    cell), then two training cells on that same model, then stop."""
    return [f"%mpify start 2{start}", f"%%ranch\n{COMMON}\n{defs}\nmodel = {model}",
            f"%%ranch\n{train}", f"%%ranch\n{train}", "%mpify stop"]


WORLDS = (
    world_cells("", LIGHTNING, "Tiny()", "lightning_fit('ddp', model, tag='lightning-world')")
    + world_cells("", HF, "Regressor()", "hf_train(hf_out, model, tag='hf-world')")
    + world_cells(" --ddp", ACCELERATE, "torch.nn.Linear(4, 1)", "accelerate_train(model, tag='accelerate-world')")
    + world_cells("", IGNITE, "torch.nn.Linear(4, 1)", "ignite_train(model, tag='ignite-world')")
    + ["%mpify start 2", f"%%ranch\n{COMMON}\n{RICH}\nshow_shard()", "%mpify stop"]
)
CELLS = [COMMON, LIGHTNING, LIGHTNING_RUNS, HF, HF_RUNS, ACCELERATE, ACCELERATE_RUNS, IGNITE, IGNITE_RUNS,
         RICH, RICH_RUNS, "%load_ext mpify", *WORLDS]

RESULT = re.compile(r"^(?:\[rank (\d+)\] )?RESULT (\{.*\})$", re.M)


# The first test bears the notebook's whole run (the module fixture below, 26 cells, five
# frameworks, launches and worlds): under a loaded machine it came within seconds of the default
# 300 s, and a test past its timeout ends its xdist worker and the run (setup.cfg).
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def executed(kernel_name, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("frameworks")
    nb = new_notebook(cells=[new_code_cell(c) for c in CELLS])
    # the kernel inherits this process's environment: HF offline (no network here), only for it
    offline = dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    before = {k: os.environ.get(k) for k in offline}
    os.environ.update(offline)
    try:
        run_notebook(nb, kernel_name, cwd=cwd, timeout=240)
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for i, cell in enumerate(nb.cells):
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, (i, cell.source[:200], [(e.ename, e.evalue, "\n".join(e.traceback)[-3000:]) for e in errors])
    return nb


ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # a progress bar's cursor show/hide before a line


def text(cell, name: str = "stdout") -> str:
    return ESCAPES.sub("", "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == name))


def results(nb, tag: str) -> list[list[dict]]:
    """Per launch (or training cell) that reported `tag`: what every rank reported, in rank
    order. The ranks' lines of one cell interleave as they arrive: a rank's k-th line is launch k's."""
    out = []
    for cell in nb.cells:
        by_rank: dict[int, list] = {}
        for m in RESULT.finditer(text(cell)):
            seen = json.loads(m.group(2))
            if seen["tag"] == tag:
                by_rank.setdefault(seen["rank"], []).append(seen)
        out.extend([list(launch) for launch in zip(*(by_rank[r] for r in sorted(by_rank)))])
    return out


def everything(cell) -> str:
    """The cell's streams and the text of its displays, as a reader of the notebook sees them."""
    shown = [o.data.get("text/plain", "") + o.data.get("text/html", "") for o in cell.outputs if "data" in o]
    return text(cell) + text(cell, "stderr") + "".join(shown)


def check(nb, tag: str, launches: int, steps: int = 4) -> list[list[dict]]:
    runs = results(nb, tag)
    assert len(runs) == launches, (tag, runs)
    for i, ranks in enumerate(runs):
        assert [r["rank"] for r in ranks] == [0, 1], (tag, i, ranks)
        for r in ranks:
            assert r["world"] == 2 and r["same"], (tag, i, r)
            assert len(r["losses"]) == steps and all(v == v and abs(v) < 1e6 for v in r["losses"]), (tag, i, r)
    return runs


def after(nb) -> dict:
    merged: dict = {}
    for cell in nb.cells:
        for line in text(cell).splitlines():
            if line.startswith("AFTER "):
                merged.update(json.loads(line[len("AFTER "):]))
    return merged


def same_training(runs) -> None:
    """The same seed and data each time: each launch trains exactly as the first one did."""
    assert all(r[0]["losses"] == runs[0][0]["losses"] for r in runs), runs


def test_lightning_ddp_and_auto_three_launches_each_and_a_world(executed):
    ddp = check(executed, "lightning", 3)
    same_training(ddp)
    auto = check(executed, "lightning-auto", 3)
    same_training(auto)
    # In a kernel Lightning would pick ddp_fork for "auto" and refuse "ddp" (interactive): the
    # ranks exist already, as under torchrun, and both train with DDP.
    assert {r["strategy"] for run in ddp + auto for r in run} == {"DDPStrategy"}
    state = after(executed)
    assert state["lightning"] == [0] * 6  # rank 0's value, whoever ran it
    assert state["rank_zero_only.rank"] == 0  # the kernel ran rank 1 once; its messages speak again
    world = check(executed, "lightning-world", 2)
    # the second training cell went on from the first one's weights
    assert world[0][0]["losses"] != world[1][0]["losses"]
    # rank 0's own progress bar, as Lightning draws it in the kernel
    assert any("Epoch 0" in everything(c) for c in executed.cells if c.source.startswith("\nlightning_runs"))


def test_hf_trainer_three_launches_and_a_world(executed):
    same_training(check(executed, "hf", 3))
    world = check(executed, "hf-world", 2)
    assert world[0][0]["losses"] != world[1][0]["losses"]


def test_accelerate_three_launches_and_a_world(executed):
    runs = check(executed, "accelerate", 3)
    same_training(runs)
    # the notebook's own Accelerator is as it was before the launches
    assert after(executed)["accelerate"] == [1, "DistributedType.NO"]
    world = check(executed, "accelerate-world", 2)
    assert world[0][0]["losses"] != world[1][0]["losses"]
    # rank 1's tqdm.auto bar reached the cell as a text bar (a display updated in place)
    cell = next(c for c in executed.cells if "accelerate_runs = " in c.source)
    bars = [o.data["text/plain"] for o in cell.outputs if o.output_type == "display_data"]
    assert any(b.startswith("[rank 1] accelerate: 100%") for b in bars), bars


def test_ignite_parallel_joins_the_ranks_three_launches_and_a_world(executed):
    runs = check(executed, "ignite", 3)
    same_training(runs)
    assert {r["backend"] for run in runs for r in run} == {"gloo"}
    assert {r["parallel_made"] for run in runs for r in run} == {"native-dist"}
    world = check(executed, "ignite-world", 2)
    assert world[0][0]["losses"] != world[1][0]["losses"]


def rich_outputs(cell, rank: int) -> list:
    return [o for o in cell.outputs if o.output_type == "display_data"
            and o.get("metadata", {}).get("mpify", {}).get("rank") == rank]


@pytest.mark.parametrize("where", ["ranch", "world"])
def test_a_child_ranks_figure_and_table_reach_the_cell_labelled(executed, where):
    marker = RICH_RUNS if where == "ranch" else "show_shard()"
    cell = next(c for c in executed.cells if c.source == marker or (where == "world" and c.source.startswith("%%ranch")
                                                                    and c.source.endswith(marker)))
    shown = rich_outputs(cell, 1)
    table = [o for o in shown if "text/html" in o.data]
    figure = [o for o in shown if "image/png" in o.data]
    assert len(table) == 1 and len(figure) == 1, [sorted(o.data) for o in cell.outputs if "data" in o]
    assert "[rank 1]" in table[0].data["text/html"] and table[0].data["text/plain"].startswith("[rank 1] ")
    assert "<table" in table[0].data["text/html"]
    import base64
    assert base64.b64decode(figure[0].data["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure[0].data["text/plain"].startswith("[rank 1] <Figure")
    # nothing of rank 1's fell back to text: no `Figure(640x480)`, no DataFrame as text
    assert "Figure(" not in text(cell) and "[rank 1]    rank" not in text(cell), text(cell)
