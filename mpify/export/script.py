"""Payload + a short `main()` = a standalone script that does not import mpify.

Why inline code rather than a helper library: the script is for the person who wrote the notebook
to read, keep and run anywhere torch is installed (a cluster with torchrun, a colleague's laptop).
So main() spells out, in a dozen lines, what mpify does for them:

- argparse options from the target's signature (the same lines `mpify run -- ...` uses: signature.py);
- with --ddp, the DDP setup of mpify's TorchDDPCtx: torchrun's env (RANK, WORLD_SIZE, MASTER_ADDR...)
  with world-size-1 defaults for plain `python script.py`; nccl when every local rank has its own
  GPU, else gloo; the rank's device from LOCAL_RANK; one intra-op thread per rank unless
  OMP_NUM_THREADS says otherwise; init_process_group(env://) and destroy_process_group even when
  the target raised;
- global rank 0 prints the result's repr.

`mpify run` imports this same text as a module; main() is then only defined, never called.
"""
from __future__ import annotations

from mpify.export.payload import Payload, render_payload
from mpify.export.signature import parser_code, target_description, target_is_async, target_params

__all__ = ["render_script", "MAIN_LOCALS"]

# Names main() binds locally; a target with one of these names is called through globals().
MAIN_LOCALS = frozenset({"argparse", "ast", "pathlib", "os", "parser", "kwargs", "result", "torch",
                         "dist", "timedelta", "socket", "sock", "backend", "use_cuda", "key", "value",
                         "literal", "or_none", "asyncio", "time", "several"})

_DDP_SETUP = '''\
    import socket
    import time
    from datetime import timedelta

    import torch
    import torch.distributed as dist

{world_of_one}    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:  # a free port for the single rank's rendezvous
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    # nccl when every local rank has its own GPU, else gloo.
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ["LOCAL_WORLD_SIZE"])
    backend = {backend}
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # one intra-op thread per rank, so ranks don't fight over cores
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=1800))
    try:
        result = {call}
    finally:
        dist.destroy_process_group()
        # DDP keeps gloo's worker threads alive past destroy_process_group. One of them may still
        # wait for the GIL to free the last collective's tensors: let it, before the interpreter
        # shuts down, or it is killed inside C++ and this rank aborts (SIGABRT) after its work.
        time.sleep(0.05)
'''


# Both kinds of script set torchrun's variables when run with plain python, as `mpify run -n 1`
# does, so a target that reads RANK works either way.
_WORLD_OF_ONE = '''\
    # Under torchrun these are set; `python {script}` is a world of one.
    for key, value in {{"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1"}}.items():
        os.environ.setdefault(key, value)
'''


def _free_name(sl, name: str) -> str:
    """`name`, or `_name`, `__name`... : one the notebook's slice does not define itself."""
    taken = {n for it in sl.items for n in it.defines}
    while name in taken:
        name = "_" + name
    return name


def _call_function(sl, call, name: str) -> list[str]:
    """A module-level function that makes the --call. Why a function of the module rather than a
    line in main(): the call's names are the notebook's globals, which main()'s own variables
    (`backend`, `result`...) would shadow; and `mpify run` runs this same function in every rank."""
    return ["", "", f"def {name}():",
            f'    """`{sl.target}` called as given to mpify with --call."""',
            f"    return {call.source}"]


def render_script(sl, ddp: bool = False, backend: str | None = None, script: str = "script.py",
                  call=None) -> Payload:
    """The payload of `sl` followed by main(); `script` is the file name shown in the usage text.
    `call`: a parsed --call (mpify.analysis.calls.CallSpec); main() then makes that call and takes
    no options."""
    params = None if call is not None else target_params(sl)
    main = _free_name(sl, "main")
    if call is not None:
        args_note = f"It runs `{call.source}` (given with --call) and takes no options."
    elif params is None:
        args_note = f"{sl.target} is called without arguments"
    elif params:
        args_note = f"Options: {' '.join(p.option + ('' if p.kind == 'bool' else ' ' + p.name.upper()) for p in params)} (see --help)."
    else:
        args_note = f"{sl.target} takes no arguments."
    opts = "" if call is not None else " [options]"
    if ddp:
        usage = ["Run it:",
                 f"    python {script}{opts}                             # one process (world size 1)",
                 f"    torchrun --nproc-per-node N {script}{opts}        # N ranks under DDP",
                 "    torchrun --nnodes M --node-rank I --master-addr HOST --master-port P \\",
                 f"        --nproc-per-node N {script}{opts}               # M nodes",
                 args_note]
    else:
        usage = ["Run it:", f"    python {script}{opts}", args_note]
    payload = render_payload(sl, usage)

    # A target named like one of main()'s own variables is reached through the module's globals.
    fn = sl.target if sl.target not in MAIN_LOCALS else f"globals()[{sl.target!r}]"
    if call is not None:
        payload.call_function = _free_name(sl, f"call_{sl.target}")
        payload.text += "\n".join(_call_function(sl, call, payload.call_function)) + "\n"
        payload.line_map[payload.text.count("\n")] = ("--call", 1)  # its `return` line, in tracebacks
        call_src = f"{payload.call_function}()"
    else:
        call_src = f"{fn}(**kwargs)" if params is not None else f"{fn}()"
    imports, opt_lines = parser_code(params or [])
    if target_is_async(sl):  # an `async def` target runs to the end on its own event loop
        call_src = f"asyncio.run({call_src})"
        imports.append("asyncio")
    desc = target_description(sl)
    out = ["", "", f"def {main}():",
           f'    """Parse the options of `{sl.target}`, run it'
           + (" under DDP (torchrun's environment), " if ddp else ", ") + 'print its result on rank 0."""',
           "    import argparse"]
    out += [f"    import {m}" for m in imports]
    out += ["    import os", ""]
    out.append(f"    parser = argparse.ArgumentParser(description={desc!r})" if desc
               else "    parser = argparse.ArgumentParser()")
    out += [("    " + ln) if ln else "" for ln in opt_lines]
    out.append("    kwargs = vars(parser.parse_args())" if params is not None else "    parser.parse_args()")
    out.append("")
    if ddp:
        be = repr(backend) if backend else '"nccl" if use_cuda and dist.is_nccl_available() else "gloo"'
        world = _WORLD_OF_ONE.format(script=script)
        out += _DDP_SETUP.format(script=script, backend=be, call=call_src, world_of_one=world).rstrip("\n").split("\n")
    else:
        out += _WORLD_OF_ONE.format(script=script).rstrip("\n").split("\n")
        out.append(f"    result = {call_src}")
    out += ['    if os.environ.get("RANK", "0") == "0":  # under torchrun, only global rank 0 prints',
            "        print(repr(result))",
            "", "",
            'if __name__ == "__main__":',
            f"    {main}()"]
    payload.text += "\n".join(out) + "\n"
    return payload
