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
    """In the child: run the cases of module.func() (but those listed in KS_ISOLATED_SKIP), one JSON line before
    and after each."""
    import importlib

    skip = set(json.loads(os.environ.get("KS_ISOLATED_SKIP", "[]")))
    mod = importlib.import_module(module)
    for case_id, fn in getattr(mod, func)():
        if case_id in skip:
            continue
        print(_MARK + json.dumps({"id": case_id, "start": True}), flush=True)
        try:
            rec = {"id": case_id, "returned": fn()}
        except Exception as e:  # noqa: BLE001 - the parent judges the exception
            notes = "\n".join(getattr(e, "__notes__", ()))  # e.g. hypothesis' falsifying example
            rec = {"id": case_id, "exc": type(e).__name__, "msg": (str(e) + ("\n" + notes if notes else ""))[:8000]}
        print(_MARK + json.dumps(rec, default=str), flush=True)


def _child(module: str, func: str, timeout: float, env: Dict[str, str]):
    """One child run: (stdout, stderr, why it died or None)."""
    cmd = [sys.executable, "-c", f"import isolated; isolated.child_main({module!r}, {func!r})"]
    try:
        proc = subprocess.run(cmd, cwd=_TESTS, env=env, capture_output=True, text=True, timeout=timeout)
        return proc.stdout, proc.stderr, (f"exit status {proc.returncode}" if proc.returncode else None)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return out, err, f"timed out after {timeout} s"


def run_cases(module: str, func: str, timeout: float = 600, env: Dict[str, str] = None,
              restarts: int = 10) -> Dict[str, dict]:
    """Run module.func()'s cases in a child; {case_id: record}. A child that dies in a case is restarted (up to
    `restarts` times) on the cases it did not reach; a case never reached is absent."""
    import kernswap

    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(kernswap.__file__)))
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env["PYTHONPATH"] = os.pathsep.join([_TESTS, pkg_root, child_env.get("PYTHONPATH", "")])
    recs: Dict[str, dict] = {}
    for _ in range(restarts + 1):
        child_env["KS_ISOLATED_SKIP"] = json.dumps(sorted(recs))
        out, err, died = _child(module, func, timeout, child_env)
        crashed = None
        for line in out.splitlines():
            if line.startswith(_MARK):
                rec = json.loads(line[len(_MARK):])
                if rec.pop("start", False):
                    crashed = rec["id"]
                    recs[crashed] = {"crashed": f"child died in this case ({died}): {err[-3000:]}"}
                else:
                    recs[rec["id"]] = rec
                    crashed = None
        if not died:
            break
        if crashed is None:  # died outside any case (import, teardown): nothing to restart on
            recs.setdefault("<child>", {"crashed": f"child died outside a case ({died}): {err[-3000:]}"})
            break
    return recs
