"""Past one machine through Slurm: the other nodes' ranks run in resident node processes that
`srun` starts, one per other node of the allocation the caller runs in.

- agents.py: the caller's side: the allocation's nodes, each node process as an `Agent` (its srun
  step, its authenticated channel), lent to one launch or world at a time and kept warm between;
- node.py: the node process itself (`python -m mpify.engine.slurm.node`, run by srun), which runs
  that node's ranks with the engine's own `ranch` or `World` and answers on the channel.

launch/ and world/ use agents.py; node.py, a main program, uses them in turn.
"""
