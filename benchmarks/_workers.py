"""Functions the benchmarks launch, in an importable module so that every launcher (spawn
included) can find them by name."""
import os


def trivial(*_):
    return int(os.environ.get("RANK", "0"))


def gloo_allreduce(*_):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.destroy_process_group()
    return t.item()


def ddp_train(*_):
    """The workload mpify exists for, written as for torchrun: its own group, a DDP model,
    20 steps, destroy. (Its first DDP construction in a process imports torch._dynamo.)"""
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    model = DDP(nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(20):
        opt.zero_grad()
        loss = model(torch.randn(16, 64)).pow(2).mean()
        loss.backward()
        opt.step()
    dist.destroy_process_group()
    return float(loss)


def spawn_entry(local_rank, fn_name, world):
    """torch.multiprocessing.spawn passes the local rank first; set torchrun's variables."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world))
    return globals()[fn_name]()


def returns_value(*_):
    return int(os.environ.get("RANK", "0")) * 10


def raises_in_rank_1(*_):
    if os.environ.get("RANK") == "1":
        raise ValueError("boom in rank 1")
    return 0


def killed_in_allreduce(*_):
    """Rank 1 is SIGKILLed (as the OOM killer would) while the others wait in an all_reduce."""
    import signal
    import time

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.destroy_process_group()


def sleeps(*_):
    import time
    time.sleep(60)


def touch(*arrays):
    """Read the last element of each large argument (what bench_big_args checks)."""
    return [float(a[-1]) for a in arrays]


def spawn_touch(local_rank, *arrays):
    return touch(*arrays)
