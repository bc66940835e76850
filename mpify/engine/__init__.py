"""The ranch engine: start ranks, set their environment, run ctx+fn, collect results and errors,
forward output, tear everything down. Imports nothing from analysis, export or cli."""
