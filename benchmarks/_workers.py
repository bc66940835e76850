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


def spawn_entry(local_rank, fn_name, world):
    """torch.multiprocessing.spawn passes the local rank first; set torchrun's variables."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world))
    return globals()[fn_name]()
