"""Starting rank processes: warm forkservers that fork a launch's ranks (spawn on Windows).

- pool.py: which forkserver serves a launch (complete, else ready and fitting, else the first
  ready), which start ahead of need (`prewarm`, `catch_up`), which retire; what they preload;
- forkserver.py: one forkserver process (`Server`), its socket, the files a killed caller leaves
  behind, and how a rank is forked from the one chosen (`RankProcess`);
- zygote.py: the forked caller: the caller itself forked into a forkserver, for a first launch
  that would otherwise wait for one;
- warm.py: run in a forkserver: what it imports beyond numpy and torch, each import checked.

What a rank then runs is rank/'s.
"""
