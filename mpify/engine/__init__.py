"""The ranch engine: start ranks, set their environment, run ctx+fn, collect results and errors,
forward output, tear everything down. Imports nothing from analysis, export or cli.

Why torch_ddp is imported here: it registers torch's hooks with the rendezvous and the tensor
codec with shm (a side effect of importing it), and a rank that unpickles a tensor argument needs
that codec. That used to come with `import mpify`, which imported every room; `mpify/__init__.py`
now loads names on first use (so that `mpify deps` and `mpify export` never load the engine), so
the engine makes sure of it itself: whatever imports a module of the engine, a rank included, has
the registrations. torch_ddp imports torch only when it is used.
"""
import mpify.torch_ddp  # noqa: E402,F401  (registrations; see above)
