"""Test cases run in a child interpreter, so a crash (segfault, abort, hang) fails the cases it hit instead of
killing the pytest run.

A test module defines a generator function yielding ``(case_id, fn)``; :func:`run_cases` runs them all in one
child (``python -c``) and returns, per case id, a record: ``{"returned": fn's return value}``, ``{"exc": type name,
"msg": message}`` for an exception, or ``{"crashed": why}`` when the child died (or timed out) in or before it.
"""
import json
import os
import subprocess
import sys
from typing import Dict

_TESTS = os.path.dirname(os.path.abspath(__file__))
_MARK = "@@case "


def child_main(module: str, func: str) -> None:
    """In the child: run every case of module.func(), one JSON line before and after each."""
    import importlib

    mod = importlib.import_module(module)
    for case_id, fn in getattr(mod, func)():
        print(_MARK + json.dumps({"id": case_id, "start": True}), flush=True)
        try:
            rec = {"id": case_id, "returned": fn()}
        except Exception as e:  # noqa: BLE001 - the parent judges the exception
            rec = {"id": case_id, "exc": type(e).__name__, "msg": str(e)[:4000]}
        print(_MARK + json.dumps(rec, default=str), flush=True)


def run_cases(module: str, func: str, timeout: float = 600, env: Dict[str, str] = None) -> Dict[str, dict]:
    """Run module.func()'s cases in a child; {case_id: record} (cases never reached are absent)."""
    import kernswap

    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(kernswap.__file__)))
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env["PYTHONPATH"] = os.pathsep.join([_TESTS, pkg_root, child_env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", f"import isolated; isolated.child_main({module!r}, {func!r})"]
    try:
        proc = subprocess.run(cmd, cwd=_TESTS, env=child_env, capture_output=True, text=True, timeout=timeout)
        out, err, died = proc.stdout, proc.stderr, (proc.returncode != 0 and f"exit status {proc.returncode}")
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        died = f"timed out after {timeout} s"
    recs: Dict[str, dict] = {}
    for line in out.splitlines():
        if line.startswith(_MARK):
            rec = json.loads(line[len(_MARK):])
            if rec.pop("start", False):
                recs[rec["id"]] = {"crashed": f"child died in this case ({died}): {err[-2000:]}"}
            else:
                recs[rec["id"]] = rec
    if died and not recs:
        recs["<child>"] = {"crashed": f"child died before any case ({died}): {err[-2000:]}"}
    return recs
