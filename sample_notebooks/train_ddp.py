"""`train` from sample_notebooks/ddp_train.ipynb, exported by mpify.

Cells used: 2, 3, 4, 5 (numbered as in Jupyter: all cells, markdown included).

Run it:
    python train_ddp.py [options]                             # one process (world size 1)
    torchrun --nproc-per-node N train_ddp.py [options]        # N ranks under DDP
    torchrun --nnodes M --node-rank I --master-addr HOST --master-port P \\
        --nproc-per-node N train_ddp.py [options]               # M nodes
Options: --epochs EPOCHS --lr LR --batch-size BATCH_SIZE --seed SEED (see --help).
"""


# ---- cell 2 ----
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm


# ---- cell 3 ----
# Synthetic data: y = x . w + noise, the same on every rank (fixed seed).
class Synthetic(Dataset):
    def __init__(self, n=2048, d=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d, generator=g)
        w = torch.randn(d, 1, generator=g)
        self.y = self.x @ w + 0.1 * torch.randn(n, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


# ---- cell 4 ----
def make_model(d=16):
    return nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 1))


# ---- cell 5 ----
def train(epochs: int = 3, lr: float = 0.05, batch_size: int = 64, seed: int = 0):
    """Train with DDP; return the losses and the trained model.

    The losses: the mean of each epoch, and the trained model's on all the data. The model is
    rank 0's copy (DDP keeps the weights the same on every rank)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(seed)
    rank, world = dist.get_rank(), dist.get_world_size()
    data = Synthetic()
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler)
    model = DDP(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        total = torch.zeros(2)
        for xb, yb in tqdm(loader, desc=f"epoch {epoch}", disable=rank != 0):
            loss = F.mse_loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += torch.tensor([loss.item() * len(xb), len(xb)])
        dist.all_reduce(total)  # sum over ranks
        losses.append(round((total[0] / total[1]).item(), 6))
    with torch.no_grad():
        final_loss = round(F.mse_loss(model.module(data.x), data.y).item(), 6)
    return {"world_size": world, "losses": losses, "final_loss": final_loss, "model": model.module}


def main():
    """Parse the options of `train`, run it under DDP (torchrun's environment), print its result on rank 0."""
    import argparse
    import os

    parser = argparse.ArgumentParser(description='Train with DDP; return the losses and the trained model.')
    parser.add_argument('--epochs', dest='epochs', type=int, default=argparse.SUPPRESS, help='int (default: 3)')
    parser.add_argument('--lr', dest='lr', type=float, default=argparse.SUPPRESS, help='float (default: 0.05)')
    parser.add_argument('--batch-size', '--batch_size', dest='batch_size', type=int, default=argparse.SUPPRESS, help='int (default: 64)')
    parser.add_argument('--seed', dest='seed', type=int, default=argparse.SUPPRESS, help='int (default: 0)')
    kwargs = vars(parser.parse_args())

    import socket
    import time
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    # Under torchrun these are set; `python train_ddp.py` is a world of one.
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:  # a free port for the single rank's rendezvous
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    # nccl when every local rank has its own GPU, else gloo.
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ["LOCAL_WORLD_SIZE"])
    backend = "nccl" if use_cuda and dist.is_nccl_available() else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # one intra-op thread per rank, so ranks don't fight over cores
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=1800))
    try:
        result = train(**kwargs)
    finally:
        dist.destroy_process_group()
        # DDP keeps gloo's worker threads alive past destroy_process_group. One of them may still
        # wait for the GIL to free the last collective's tensors: let it, before the interpreter
        # shuts down, or it is killed inside C++ and this rank aborts (SIGABRT) after its work.
        time.sleep(0.05)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, only global rank 0 prints
        print(repr(result))


if __name__ == "__main__":
    main()
