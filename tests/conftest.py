import os
import shutil
import sys
import tempfile
from contextlib import contextmanager

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# mpify's disk caches (star imports, notebooks read before) go to a directory of the test run's
# own, never the user's ~/.cache/mpify; subprocesses (`mpify export`, kernels) inherit it.
_CACHE = os.environ["MPIFY_CACHE_DIR"] = tempfile.mkdtemp(prefix="mpify-test-cache-")


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)

from helpers import strays  # noqa: E402

# A function launched from this process lives in a test module, which each rank imports by name
# at every launch (engine/args/serialize.py): with it pytest (0.35 s), psutil (helpers.py), and, for
# its `from mpify import ranch`, every module of mpify's public surface, the analyzer and the
# exporter included (mpify/__init__.py: 0.4 s, 1.2 s where no bytecode is cached). A user's
# notebook function travels by value and pays none of it. A forkserver preloads what every rank
# runs and the packages its caller imported, never a test runner's (engine/start/): this
# session's forkservers preload these too, so that a launch from a test costs what a user's does.
import mpify  # noqa: E402
from mpify.engine.start import forkserver  # noqa: E402

forkserver.BASE_MODULES = (*forkserver.BASE_MODULES, "pytest", "psutil", *mpify._REGISTRARS,
                           *dict.fromkeys(mpify._WHERE.values()))


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (setup.cfg): a worker per core, at most 4. Each worker starts its own shared
    kernel and forkservers, and most tests are bound by the CPU their processes' torch imports
    take, so more workers than cores only add load (and the timing bounds some tests hold)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 4))


# The files that take longest (in that order, by `--durations` of a one-process run on the 2-core VM), run
# first: the workers take files in collection order, and a long file taken last keeps one worker
# busy while the other has nothing left to do.
_LONGEST_FIRST = ("test_cli_export.py", "test_ddp_workload.py", "test_first_launch.py",
                  "test_slice_course_notebooks.py", "test_frameworks.py", "test_cli_run.py",
                  "test_world_kernel.py", "test_resident.py", "test_slice_aliasing.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order kept


@pytest.fixture
def no_strays():
    """Fails the test if it leaves any process of its own behind (keepers aside)."""
    yield
    left = strays()
    for p in left:
        p.kill()
    assert not left, f"processes left behind: {[(p.pid, p.cmdline()[:3]) for p in left]}"


@pytest.fixture(scope="session")
def kernel_name(tmp_path_factory):
    """A Jupyter kernelspec that runs this very interpreter (the venv with mpify installed), so
    nbclient starts a real ipykernel that can import mpify."""
    import json

    root = tmp_path_factory.mktemp("jupyter")
    name = "mpify-test"
    spec_dir = root / "kernels" / name
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mpify test", "language": "python"}))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(root) + (os.pathsep + old if old else "")
    yield name
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


def run_notebook(nb, kernel_name, cwd=None, timeout=300):
    """Execute a notebook in a real kernel of its own (nbclient), errors kept in the outputs."""
    from nbclient import NotebookClient

    client = NotebookClient(nb, kernel_name=kernel_name, timeout=timeout, allow_errors=True,
                            resources={"metadata": {"path": str(cwd or os.getcwd())}})
    client.execute()
    return nb


# Run before each notebook in the shared kernel: the user's namespace emptied (`%reset -f`), the
# modules imported from a test's folder forgotten (helpers.py beside one notebook is not another's),
# and the working directory, sys.path and os.environ as a kernel started in `cwd` has them.
_RESET = """\
import importlib as _il, os as _os, sys as _sys
for _n, _m in list(_sys.modules.items()):
    if (getattr(_m, '__file__', None) or '').startswith({tmp!r}):
        del _sys.modules[_n]
_os.chdir({cwd!r})
_sys.path[:] = {path!r}
_os.environ.clear()
_os.environ.update({environ!r})
_il.invalidate_caches()
get_ipython().run_line_magic('reset', '-f')
globals().update({{k: v for k, v in {dunders!r}.items() if k not in globals()}})
"""
# `%reset -f` also deletes dunder names a fresh kernel has (`__spec__`: multiprocess reads it at a
# forkserver's start, and a launch after `%reset -f` fails without it): they are put back.
_BOOT = ("import json, os, sys\nprint(json.dumps([os.getpid(), sys.path, dict(os.environ), "
         "{k: v for k, v in globals().items() if k.startswith('__') and isinstance(v, (str, type(None)))}]))")


class SharedKernel:
    """One real kernel (nbclient + ipykernel) for the session's notebooks: a kernel start, its
    torch import and its warm forkserver once, not once per notebook. Each notebook runs in it as
    in a kernel started in its folder (see _RESET); what a notebook's launches start must be gone
    when it ends (`strays`), the kernel and its forkserver and resource tracker aside."""

    def __init__(self, kernel_name, home, tmp_root):
        from nbclient import NotebookClient
        from nbformat.v4 import new_code_cell, new_notebook

        self.kernel_name, self.tmp_root = kernel_name, str(tmp_root)
        boot = NotebookClient(new_notebook(cells=[new_code_cell(_BOOT)]), kernel_name=kernel_name,
                              timeout=120, allow_errors=False, resources={"metadata": {"path": str(home)}})
        boot.km = boot.create_kernel_manager()
        boot.start_new_kernel(cwd=str(home))
        boot.start_new_kernel_client()
        self.km, self.kc, self._boot = boot.km, boot.kc, boot
        import json
        boot.execute(cleanup_kc=False)
        self.pid, self.path, self.environ, self.dunders = json.loads(boot.nb.cells[0].outputs[0]["text"])
        import helpers
        helpers.SHARED_KERNELS.add(self.pid)

    def _client(self, nb, timeout):
        from nbclient import NotebookClient

        client = NotebookClient(nb, km=self.km, kernel_name=self.kernel_name, timeout=timeout, allow_errors=True)
        client.kc = self.kc  # the session's client too: its channels stay open between notebooks
        return client

    def run(self, nb, cwd, timeout=300):
        """Execute `nb` in the shared kernel as if the kernel had been started in `cwd`, errors
        kept in the outputs (run_notebook's contract)."""
        from nbformat.v4 import new_code_cell, new_notebook

        reset = new_notebook(cells=[new_code_cell(_RESET.format(tmp=self.tmp_root, cwd=str(cwd),
                                                                path=self.path, environ=self.environ,
                                                                dunders=self.dunders))])
        self._client(reset, 60).execute(cleanup_kc=False)
        errors = [o for o in reset.cells[0].outputs if o.output_type == "error"]
        assert not errors, errors
        self._client(nb, timeout).execute(cleanup_kc=False)
        return nb

    def close(self):
        import helpers

        self._boot.shutdown_kernel = "graceful"
        self._boot._cleanup_kernel()  # shuts the kernel down, waits for it, stops the channels
        helpers.SHARED_KERNELS.discard(self.pid)


@pytest.fixture(scope="session")
def shared_kernel(kernel_name, tmp_path_factory):
    """The session's shared kernel (SharedKernel). When it shuts down at the end, nothing it
    started may be left."""
    kernel = SharedKernel(kernel_name, tmp_path_factory.mktemp("shared-kernel"), tmp_path_factory.getbasetemp())
    yield kernel
    kernel.close()
    left = [p for p in strays() if p.pid != kernel.pid]
    from helpers import wait_gone
    assert not wait_gone([p.pid for p in left], 10.0), f"the shared kernel left {left}"


@pytest.fixture
def tmpdir_(tmp_path):
    """A TMPDIR of the test's own for `mpify run`/`export`: nothing may be left in it."""
    from export_helpers import leftovers

    d = tmp_path / "tmproot"
    d.mkdir()
    yield d
    assert leftovers(d) == [], "mpify run left files in the temp root"


@contextmanager
def jupyter_kernel(kernel_name):
    """A real kernel (jupyter_client) and its client, ready; shut down afterwards."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name=kernel_name)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        yield km, kc
    finally:
        kc.stop_channels()
        if km.is_alive():
            km.shutdown_kernel(now=True)


def skip_without_slurm() -> None:
    """Skip where no real Slurm cluster can start here (not root, no apt-get)."""
    from slurm_cluster import ensure_available

    ok, why = ensure_available()
    if not ok:
        pytest.skip(f"no Slurm cluster here: {why}")


@pytest.fixture(scope="module")
def cluster():
    """A real 2-node Slurm cluster on this machine (tests/slurm_cluster.py), for one test file."""
    from slurm_cluster import SlurmCluster

    skip_without_slurm()
    c = SlurmCluster(nodes=2)
    c.start()
    try:
        yield c
    finally:
        c.stop()
