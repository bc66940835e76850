"""The ranch engine: start ranks, set their environment, run ctx+fn, collect results and errors,
forward output, tear everything down. It imports only itself: not `mpify` (the public surface),
the analysis, the exporter, the CLI, the extension or the torch part (mpify/torchddp registers
its store and tensor codec with the engine when imported).

Its parts, one line each; each room is a folder whose __init__ says more, and imports only what
is listed before it here (tests/test_layout.py checks it):

- errors.py, debug.py, env.py, rendezvous.py: shared: the typed errors, MPIFY_DEBUG, the rank
  environment (torchrun's variables), where the ranks meet (MASTER_ADDR/PORT, torch's store);
- args/: moving arguments to the ranks: pickling by value, shared memory, snapshots kept warm;
- messages.py: what travels between the caller and its ranks, one small type per message;
- rank/: inside a rank, the caller's rank 0 included: run_rank, process groups, frameworks'
  process-wide state, a plain process, a child's displays and figures;
- output/: rank output in the caller: whole prefixed lines, every rank's progress bar live;
- start/: starting rank processes: warm forkservers, which one serves a launch, the forked caller;
- slurm/: past one machine: node processes started through srun (agents.py); node.py is that
  process, which runs launch/ and world/ on its node (the one import the other way);
- launch/: ranch and its lifecycle: the Launch and its supervisor, Ctrl-C, stopping ranks, blame;
- world/: a live world: ranks that stay between calls, its rounds, their stop, its supervisor.
"""
