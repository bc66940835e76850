"""The training frameworks users bring, three launches in a row from one script, as a user runs
them: the caller is rank 0 of every launch, so what a framework keeps process-wide must not
break the next launch (engine/frameworks.py).

One subprocess per framework (its import is paid once, the forkserver is shared by its three
launches); 2 ranks, tiny models, a few steps. Each script prints one JSON line with what every
launch saw, and the test reads it.
"""
import json
import os
import subprocess

import pytest

from helpers import die_with_parent, python_script

pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every launch returns, from rank 0: the world size the framework saw, its losses, and whether
# the weights (all-gathered after training) are equal on every rank.
COMMON = r'''
import json, math, os, sys, time
import torch
import torch.distributed as dist
from mpify import ranch, torchddp_launch

def same_everywhere(module):
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    every = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(every, flat)
    return all(torch.equal(every[0], t) for t in every)

def data(n=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return x, x.sum(1, keepdim=True)
'''

ACCELERATE = COMMON + r'''
from accelerate import Accelerator
from accelerate.state import PartialState

def train():
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data()), batch_size=4)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    losses = []
    for xb, yb in loader:
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"world": accelerator.num_processes, "losses": losses,
            "same": same_everywhere(accelerator.unwrap_model(model))}

# The notebook's own single-process Accelerator, made before any launch: it must neither leak
# into the launches nor be lost after them.
mine = Accelerator(cpu=True)
runs = [torchddp_launch(2, train),   # TorchDDPCtx made the group
        ranch(2, train),             # accelerate made it (no ctx)
        ranch(2, train)]
# A live world's rank 0 is reset the same way when the world closes.
from mpify import World
with World(2, ddp=True) as world:
    in_world = world.run(train)
after_world = ranch(2, train)
after = {"world": mine.num_processes, "type": str(PartialState().distributed_type)}
print("RESULT", json.dumps({"runs": runs, "after": after, "world": [in_world, after_world]}))
'''

LIGHTNING = COMMON + r'''
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

def fit():
    torch.manual_seed(0)
    model = Tiny()
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data()), batch_size=4)
    trainer.fit(model, loader)
    return {"world": trainer.world_size, "losses": model.losses, "same": same_everywhere(model),
            "rank": trainer.global_rank}

runs = [torchddp_launch(2, fit),     # TorchDDPCtx made the group, Lightning adopts it
        ranch(2, fit),               # Lightning made it
        ranch(2, fit, caller_rank=1)]  # the caller runs rank 1 this time
after = {"rank_zero_only.rank": rank_zero_only.rank}
print("RESULT", json.dumps({"runs": runs, "after": after}))
'''

HF_TRAINER = COMMON + r'''
import tempfile
from transformers import Trainer, TrainingArguments

class Tiny(torch.nn.Module):
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

def train(out):
    torch.manual_seed(0)
    model = Tiny()
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=4, learning_rate=0.05,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, ddp_backend="gloo")
    trainer = Trainer(model=model, args=args, train_dataset=Rows())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"world": args.world_size, "losses": losses, "same": same_everywhere(model)}

with tempfile.TemporaryDirectory() as out:
    runs = [torchddp_launch(2, train, out), ranch(2, train, out), ranch(2, train, out)]
print("RESULT", json.dumps({"runs": runs, "after": {}}))
'''


def run(tmp_path, text):
    """The script's three launches, as one user process; its RESULT line parsed."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(python_script(tmp_path, text), capture_output=True, text=True, timeout=280,
                          cwd=tmp_path, env=env, preexec_fn=die_with_parent)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def check_runs(runs, steps):
    assert len(runs) == 3
    for i, r in enumerate(runs):
        assert r["world"] == 2, (i, r)
        assert len(r["losses"]) == steps, (i, r)
        assert all(map(lambda v: v == v and abs(v) < 1e6, r["losses"])), (i, r)  # finite
        assert r["same"], (i, r)
    # the same seed and data each time: each launch trains exactly as the first one did
    assert runs[1]["losses"] == runs[0]["losses"] == runs[2]["losses"]


def test_accelerate_three_launches_in_a_row(tmp_path):
    pytest.importorskip("accelerate")
    out = run(tmp_path, ACCELERATE)
    check_runs(out["runs"], steps=4)  # 32 samples, 2 ranks, batches of 4
    check_runs(out["runs"][:1] + out["world"], steps=4)  # in a world, then a launch after it closed
    # the notebook's own Accelerator is as it was before the launches
    assert out["after"] == {"world": 1, "type": "DistributedType.NO"}


def test_lightning_three_launches_in_a_row(tmp_path):
    pytest.importorskip("lightning")
    out = run(tmp_path, LIGHTNING)
    check_runs(out["runs"], steps=4)
    assert [r["rank"] for r in out["runs"]] == [0, 0, 0]  # rank 0's value, whoever ran it
    # the caller ran rank 1 in the last launch; its own rank_zero messages speak again
    assert out["after"] == {"rank_zero_only.rank": 0}


def test_hf_trainer_three_launches_in_a_row(tmp_path):
    pytest.importorskip("transformers")
    out = run(tmp_path, HF_TRAINER)
    check_runs(out["runs"], steps=4)
