"""Rank output in the caller: what the ranks print, draw and display, shown where the caller is.

- lines.py: each rank's stdout/stderr read by the supervisor and written to the caller's streams
  as whole lines, prefixed `[rank N] `, never interleaved mid-line with the caller's own; a child
  rank's displays (rank/displays.py) shown as display outputs of the cell;
- bars.py: a rank's progress bar (a line redrawn with '\\r') shown live while it is redrawn: one
  display per bar in a notebook cell, one line per bar kept at the bottom of a terminal.
"""
