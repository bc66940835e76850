"""Slices of public notebooks against a reader's labels: how many statements a target needs are kept,
how many a careful reader cuts are kept too, which targets the analyzer refuses.

The notebooks and labels are in benchmarks/validation/ (see its README.md): each label names a
notebook, a target (`--fn`, or a `--call` text) and the top-level statements a careful reader keeps
for it, as (cell, first line) with cells numbered 1-based counting markdown cells, as mpify counts
them. The labels were written by reading the notebooks, before the analyzer ran on them, and are not
tuned to its output.

For each label the slice is taken as `mpify deps` takes it (mpify.export.prepare.slice_target: a
`--call` slices in the names the call uses, as of the end of the notebook; `--fn` alone slices as of
the notebook's last run of the target) and compared by (cell, first line of the statement):

    needed kept      labelled statements in the slice / labelled statements
    needless kept    statements in the slice the label does not list
    clean            every needed statement kept and nothing needless
    error            the analyzer raised (the error's class and first line)

Totals: clean slices, needed statements kept, needless statements kept out of the statements a
reader cuts (each label's code statements not in its `needed`: top-level statements of code cells,
IPython syntax translated as mpify translates it), refusals.

    python benchmarks/bench_slices.py            # the table and the totals
    python benchmarks/bench_slices.py --json     # the same as JSON
    python benchmarks/bench_slices.py --detail   # also each needless and missing statement, with the reasons
    python benchmarks/bench_slices.py --run      # also export and run the slices labelled runnable_here

`--run` exports each runnable target with `python -m mpify export NB --fn F [--call C] -o TMP` and
runs the script with `--timeout` seconds (default 300) in a temporary directory, one at a time.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VALIDATION = os.path.join(HERE, "validation")
NOTEBOOKS = os.path.join(VALIDATION, "notebooks")
LABELS = os.path.join(VALIDATION, "labels.json")

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# --- the notebook's statements, without the slicer ------------------------------------------------

def _cells(path: str) -> list:
    """[(index 1-based among all cells, cell_type, source)] of a stored .ipynb."""
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    out = []
    for i, c in enumerate(nb["cells"], 1):
        src = c.get("source", "")
        out.append((i, c.get("cell_type"), src if isinstance(src, str) else "".join(src)))
    return out


def _python_text(source: str):
    """(python text line for line with the cell, [extra first lines]) for one code cell: mpify's own
    magic translation when it imports, else magics and shell lines blanked."""
    try:
        from mpify.analysis.magics import translate_cell
        py = translate_cell(source)
        extra = [_first_code_line(source)] if py.file_write else []
        return py.text, extra
    except Exception:  # the analysis package is being restructured: fall back to a plain reading
        lines = source.splitlines()
        first = _first_code_line(source)
        if first and lines[first - 1].startswith("%%"):
            name = lines[first - 1][2:].split(" ")[0]
            if name == "writefile":
                return "\n" * len(lines), [first]
            if name not in ("time", "timeit", "capture"):
                return "\n" * len(lines), []
            lines[first - 1] = ""
        out = [("" if ln.lstrip().startswith(("%", "!")) else ln) for ln in lines]
        return "\n".join(out), []


def _first_code_line(source: str) -> int:
    for i, ln in enumerate(source.splitlines(), 1):
        if ln.strip():
            return i
    return 0


def statements(path: str) -> list:
    """[(cell, first line)] of the top-level statements of the notebook's code cells (a decorated
    definition starts at its first decorator, as mpify counts it)."""
    out = []
    for idx, kind, src in _cells(path):
        if kind != "code":
            continue
        text, extra = _python_text(src)
        out += [(idx, ln) for ln in extra]
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in tree.body:
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            out.append((idx, first))
    return sorted(set(out))


# --- the slice, as `mpify deps` takes it ------------------------------------------------------------

def take_slice(nb: str, target: str, call: str | None):
    """The Slice for `--fn target` or `--call call`, as the CLI takes it."""
    try:
        from mpify.export.prepare import slice_target
    except ImportError:  # an older or restructured layout: the same choice by hand
        from mpify.analysis import slice_notebook
        from mpify.analysis.calls import parse_call
        spec = parse_call(call) if call else None
        return slice_notebook(nb, target, extra_roots=spec.names if spec else (), at_run=spec is None)
    sl, _ = slice_target(nb, None if call else target, call=call)
    return sl


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def measure(label: dict) -> dict:
    nb = os.path.join(NOTEBOOKS, label["notebook"])
    stmts = statements(nb)
    needed = {tuple(x) for x in label["needed"]}
    row = {"notebook": label["notebook"], "target": label["target"], "call": label["call"],
           "statements": len(stmts), "needed": len(needed), "reader_cuts": len(set(stmts) - needed),
           "unknown_labels": sorted(needed - set(stmts))}
    t0 = time.perf_counter()
    try:
        sl = take_slice(nb, label["target"], label["call"])
    except Exception as e:  # noqa: BLE001 - a refusal or a crash is what this measures
        row.update(error=_first_line(e), seconds=round(time.perf_counter() - t0, 3), needed_kept=0,
                   needless=[], missing=sorted(needed), clean=False, kept=0)
        return row
    row["seconds"] = round(time.perf_counter() - t0, 3)
    items = {(it.cell, it.lineno): it for it in sl.items}
    kept = set(items)
    row.update(error=None, kept=len(kept), needed_kept=len(needed & kept),
               needless=sorted(kept - needed), missing=sorted(needed - kept),
               clean=needed <= kept and not (kept - needed), warnings=list(sl.warnings))
    row["needless_detail"] = [_describe(items[k]) for k in row["needless"]]
    row["missing_detail"] = [_source_line(nb, *k) for k in row["missing"]]
    return row


def _describe(it) -> dict:
    lines = it.source.splitlines()
    k = it.lineno - it.source_lineno
    first = lines[k].strip() if 0 <= k < len(lines) else ""
    return {"cell": it.cell, "line": it.lineno, "source": first + (" ..." if it.end_lineno > it.lineno else ""),
            "reasons": list(it.reasons)}


def _source_line(nb: str, cell: int, line: int) -> dict:
    for idx, _, src in _cells(nb):
        if idx == cell:
            lines = src.splitlines()
            return {"cell": cell, "line": line, "source": lines[line - 1].strip() if line <= len(lines) else ""}
    return {"cell": cell, "line": line, "source": ""}


# --- running the runnable slices --------------------------------------------------------------------

def run_slice(label: dict, timeout: float) -> dict:
    nb = os.path.join(NOTEBOOKS, label["notebook"])
    with tempfile.TemporaryDirectory(prefix="mpify-validation-") as tmp:
        script = os.path.join(tmp, f"{label['target']}.py")
        cmd = [sys.executable, "-m", "mpify", "export", os.path.abspath(nb), "-o", script]
        cmd += ["--call", label["call"]] if label["call"] else ["--fn", label["target"]]
        exp = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if exp.returncode != 0:
            return {"ran": False, "stage": "export", "rc": exp.returncode, "tail": _tail(exp.stderr)}
        # The script runs beside a copy of what sits next to the notebook (modules, data files).
        src_dir = os.path.dirname(os.path.abspath(nb))
        if src_dir != os.path.abspath(NOTEBOOKS):
            for name in os.listdir(src_dir):
                if not name.endswith(".ipynb"):
                    os.symlink(os.path.join(src_dir, name), os.path.join(tmp, name))
        t0 = time.perf_counter()
        try:
            r = subprocess.run([sys.executable, script], capture_output=True, text=True, cwd=tmp, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ran": False, "stage": "run", "rc": None, "tail": f"timeout after {timeout:g} s"}
        return {"ran": r.returncode == 0, "stage": "run", "rc": r.returncode,
                "seconds": round(time.perf_counter() - t0, 1),
                "tail": _tail(r.stderr if r.returncode else r.stdout)}


def _tail(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


# --- report ------------------------------------------------------------------------------------------

def totals(rows: list) -> dict:
    ok = [r for r in rows if not r["error"]]
    t = {"targets": len(rows), "notebooks": len({r["notebook"] for r in rows}),
         "clean": sum(r["clean"] for r in rows),
         "needed_kept": sum(r["needed_kept"] for r in rows), "needed": sum(r["needed"] for r in rows),
         "needless_kept": sum(len(r["needless"]) for r in ok),
         "reader_cuts": sum(r["reader_cuts"] for r in rows),
         "refused": sum(1 for r in rows if r["error"]),
         "seconds": round(sum(r["seconds"] for r in rows), 2)}
    runs = [r["run"] for r in rows if r.get("run")]
    if runs:
        t["runs"] = {"tried": len(runs), "ran": sum(x["ran"] for x in runs)}
    return t


def print_table(rows: list, tot: dict, detail: bool) -> None:
    head = ["notebook", "target", "needed kept", "needless kept", "clean", "refused/crashed"]
    if any(r.get("run") for r in rows):
        head.append("run")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(" --- " for _ in head) + "|")
    for r in rows:
        nb = r["notebook"].split("/")[-1].removesuffix(".ipynb")
        tgt = f"`{r['target']}`" + (" (call)" if r["call"] else "")
        cells = [nb, tgt, f"{r['needed_kept']}/{r['needed']}", "-" if r["error"] else str(len(r["needless"])),
                 "yes" if r["clean"] else "no", r["error"] or ""]
        if "run" in head:
            x = r.get("run")
            cells.append("" if not x else ("ran" if x["ran"] else f"failed ({x['stage']}): {x['tail']}"))
        print("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    print()
    print(f"clean slices: {tot['clean']}/{tot['targets']} ({tot['notebooks']} notebooks)")
    print(f"needed statements kept: {tot['needed_kept']}/{tot['needed']}")
    print(f"needless statements kept: {tot['needless_kept']} (of {tot['reader_cuts']} statements a reader cuts)")
    print(f"refusals: {tot['refused']}")
    if "runs" in tot:
        print(f"runs: {tot['runs']['ran']}/{tot['runs']['tried']} runnable slices ran")
    print(f"analysis time: {tot['seconds']} s in all")
    bad = [r for r in rows if r["unknown_labels"]]
    for r in bad:
        print(f"label error: {r['notebook']} {r['target']}: no statement starts at {r['unknown_labels']}")
    if detail:
        for r in rows:
            if not (r["needless"] or r["missing"] or r["error"]):
                continue
            print(f"\n## {r['notebook']} :: {r['target']}" + (f" --call {r['call']}" if r["call"] else ""))
            if r["error"]:
                print(f"  error: {r['error']}")
            for m in r.get("missing_detail", []):
                print(f"  missing  cell {m['cell']}, line {m['line']}: {m['source']}")
            for d in r.get("needless_detail", []):
                print(f"  needless cell {d['cell']}, line {d['line']}: {d['source']}")
                for why in d["reasons"]:
                    print(f"      - {why}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the rows and totals as JSON")
    ap.add_argument("--detail", action="store_true", help="list each needless and missing statement")
    ap.add_argument("--run", action="store_true", help="export and run the slices labelled runnable_here")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds for each run (with --run)")
    ap.add_argument("--only", help="only labels whose notebook contains this text")
    args = ap.parse_args(argv)
    with open(LABELS, encoding="utf-8") as f:
        labels = json.load(f)
    if args.only:
        labels = [lb for lb in labels if args.only in lb["notebook"]]
    rows = []
    for lb in labels:
        row = measure(lb)
        if args.run and str(lb.get("runnable_here", "")).startswith("true"):
            row["run"] = run_slice(lb, args.timeout)
        rows.append(row)
    tot = totals(rows)
    if args.json:
        print(json.dumps({"rows": rows, "totals": tot}, indent=2))
    else:
        print_table(rows, tot, args.detail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
