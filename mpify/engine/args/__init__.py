"""Moving a launch's arguments to its ranks: what `fn`, its arguments and its globals become on
the way, and how big buffers avoid being pickled once per rank.

- serialize.py: pickling by value with dill, once, before any process starts; what cannot travel
  is named (ShipError);
- shm.py: large arrays and tensors through shared memory (a memfd each rank maps copy-on-write);
- resident.py: those shared copies kept between launches, refreshed page by page;
- writewatch.py: which pages the caller wrote since the last launch (userfaultfd, PAGEMAP_SCAN).
"""
