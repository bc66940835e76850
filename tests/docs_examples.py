"""The README's and the docs' examples, run as a user would run them (Sybil collects them).

Why a kernel: the examples are notebook code (`ranch` with the kernel as rank 0, `%load_ext mpify`,
`%%ranch` cells), and what a notebook user sees is what they promise. So every page runs like a
notebook: its ```python blocks execute in order in one real IPython kernel of its own (started in a
folder of the page's own, with a copy of `sample_notebooks/`), each block a cell; a cell that
raises fails its example with the kernel's traceback. Its ```console blocks are shell sessions run
in the same folder: each `$ command` runs in bash, and the lines under it are its expected output
(`...` on a line of its own stands for any lines, inside a line for any text; a last line `[exit N]`
expects that exit code, 0 otherwise). When the page ends, its kernel is shut down and nothing it
started may be left (`helpers.strays`).

A block that cannot run here (a GPU, a Slurm allocation, an install) is preceded by
`<!-- skip: next "why" -->`; tests/test_docs_blocks.py checks that every skip says why and that
every python and console block of every page is one of the examples collected here.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from sybil import Sybil
from sybil.parsers.markdown import ClearNamespaceParser, CodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parent.parent
# the documents whose examples run: the front page and every page of the docs site
PATTERNS = ["README.md", "docs/*.md"]
CELL_TIMEOUT = 240
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class PageKernel:
    """One page's kernel and folder, started at the page's first example."""

    def __init__(self) -> None:
        from jupyter_client.manager import KernelManager

        self.folder = Path(tempfile.mkdtemp(prefix="mpify-docs-"))
        shutil.copytree(ROOT / "sample_notebooks", self.folder / "sample_notebooks",
                        ignore=shutil.ignore_patterns("__pycache__"))
        # "python3" is ipykernel's own spec; jupyter_client runs it with this interpreter
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=str(self.folder), env=page_env())
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.pid = self.km.provisioner.process.pid

    def run_cell(self, source: str) -> str:
        """Executes `source` as a cell; returns its text output, raises with the traceback on error."""
        shown: list[str] = []

        def hook(msg):
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                shown.append(content["text"])
            elif kind in ("execute_result", "display_data", "update_display_data"):
                shown.append(content["data"].get("text/plain", "") + "\n")
            elif kind == "error":
                shown.append(ANSI.sub("", "\n".join(content["traceback"])) + "\n")

        reply = self.kc.execute_interactive(source, timeout=CELL_TIMEOUT, output_hook=hook)
        text = "".join(shown)
        if reply["content"]["status"] != "ok":
            raise AssertionError(f"the cell raised {reply['content'].get('ename')}:\n{text}")
        return text

    def close(self) -> None:
        import helpers

        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)
        shutil.rmtree(self.folder, ignore_errors=True)
        left = [p for p in helpers.strays() if p.pid != self.pid]
        assert not helpers.wait_gone([p.pid for p in left], 10.0), f"the page's kernel left {left}"


def page_env() -> dict:
    """The kernel's and the shell's environment: this interpreter's bin first (mpify, torchrun)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def _page(example) -> PageKernel:
    ns = example.namespace
    if ns.get("_page") is None:
        ns["_page"] = PageKernel()
    return ns["_page"]


def evaluate_python(example) -> None:
    _page(example).run_cell(str(example.parsed))


def _commands(block: str) -> list[tuple[str, list[str]]]:
    """`$ cmd` lines (a trailing backslash continues one) and the expected lines under each."""
    out: list[tuple[str, list[str]]] = []
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("$ "):
            if not out:
                raise ValueError(f"a console block must start with '$ ': {line!r}")
            out[-1][1].append(line)
            i += 1
            continue
        cmd = line[2:]
        while cmd.endswith("\\") and i + 1 < len(lines):
            i += 1
            cmd = cmd[:-1] + " " + lines[i].strip()
        out.append((cmd, []))
        i += 1
    return out


def _pattern(expected: list[str]) -> re.Pattern:
    parts = []
    for line in expected:
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(".*?".join(re.escape(p) for p in line.rstrip().split("...")) + r"[ \t]*\n")
    return re.compile("".join(parts), re.DOTALL)


def _screen(raw: str) -> str:
    """What a terminal would leave of `raw`: a line redrawn with \\r keeps its last frame."""
    lines = [ANSI.sub("", line).split("\r")[-1].rstrip() for line in raw.replace("\r\n", "\n").split("\n")]
    text = "\n".join(lines).strip("\n")
    return text + "\n" if text else ""


def evaluate_console(example) -> None:
    page = _page(example)
    for cmd, expected in _commands(str(example.parsed)):
        code = 0
        if expected and re.fullmatch(r"\[exit \d+\]", expected[-1].strip()):
            code = int(expected.pop().strip()[6:-1])
        proc = subprocess.run(["bash", "-c", cmd], cwd=page.folder, env=page_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=CELL_TIMEOUT)
        shown = _screen(proc.stdout)
        assert proc.returncode == code, f"$ {cmd}\nexit {proc.returncode}, expected {code}:\n{shown}"
        if expected:
            assert _pattern(expected).fullmatch(shown), \
                f"$ {cmd}\nexpected:\n" + "\n".join(expected) + f"\n\ngot:\n{shown}"


def _teardown(namespace: dict) -> None:
    page = namespace.pop("_page", None)
    if page is not None:
        page.close()


sybil = Sybil(
    parsers=[
        CodeBlockParser(language="python", evaluator=evaluate_python),
        CodeBlockParser(language="console", evaluator=evaluate_console),
        SkipParser(),
        ClearNamespaceParser(),
    ],
    patterns=PATTERNS,
    path=str(ROOT),
    teardown=_teardown,
)
