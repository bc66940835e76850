"""ranch and its lifecycle: one call that starts N ranks, runs fn on them, and stops them all.

- ranch.py: `ranch` itself: its arguments checked, what travels pickled, the caller's streams and
  signals taken for the launch; `shutdown`;
- supervisor.py: the `Launch` object (everything a launch starts, nothing outliving it) and its
  supervisor thread, which watches every rank's result, exit and output at once;
- interrupts.py: the caller's side of Ctrl-C, and aborting rank 0 when another rank failed;
- teardown.py: stopping ranks, each one's whole process group: SIGINT, SIGTERM, SIGKILL;
- blame.py: which of a launch's failures caused its stop, and which only followed from it.

A live world (world/) reuses these pieces for each of its rounds.
"""
