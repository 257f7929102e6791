"""Where the CPU kernels' threads run: on the host's OpenMP team (torch's) when the process has loaded an OpenMP
runtime, on kernswap's own pool otherwise or when KERNSWAP_PARALLEL=pool asks for it. Both give the same results
(every part of [0, n) runs exactly once), including calls from several Python threads at once."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import HAVE_C, NO_C_REASON
from kernswap import _ext

pytestmark = pytest.mark.skipif(not HAVE_C, reason=NO_C_REASON)

# One multi-threaded call of each kind of kernel, printed as JSON so two processes can be compared bit for bit.
_PROBE = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(2)
    import kernswap
    from kernswap import _ext
    from kernswap.config import QuantConfig
    from kernswap.formats import quantize
    g = torch.Generator().manual_seed(0)
    x = torch.randn(67, 300, generator=g)
    out = {"backend": _ext.parallel_backend()}
    for name, cfg in {"w8a8": QuantConfig(8, dynamic_activations=True), "int8": QuantConfig(8)}.items():
        qw = quantize(torch.randn(515, 300, generator=g), cfg)
        y = kernswap.ops.quantized_linear(x, qw, backend="cpu")
        out[name] = y.flatten().tolist()
    print(json.dumps(out))
""")


def _probe(env_extra):
    env = dict(os.environ, **env_extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    r = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the host OpenMP lookup is Linux-only")
def test_runs_on_torchs_openmp_team_when_loaded():
    if "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("this torch build has no OpenMP runtime")
    assert _ext.parallel_backend().startswith("openmp ("), _ext.parallel_backend()


def test_pool_and_openmp_give_identical_results():
    pool = _probe({"KERNSWAP_PARALLEL": "pool"})
    assert pool["backend"] == "kernswap pool (KERNSWAP_PARALLEL=pool)", pool["backend"]
    host = _probe({"KERNSWAP_PARALLEL": ""})
    for name in ("w8a8", "int8"):
        assert host[name] == pool[name], f"{name}: results differ between {host['backend']} and the pool"


def test_concurrent_calls_from_several_python_threads():
    """Each calling thread is the master of its own OpenMP team: calls from several Python threads at once neither
    deadlock nor mix their parts, and each matches the reference."""
    import threading

    from kernswap.config import QuantConfig
    from kernswap.formats import quantize
    from kernswap.reference import reference_linear
    import kernswap

    from conftest import assert_within, quant_tolerance

    torch.set_num_threads(2)
    qw = quantize(torch.randn(129, 96), QuantConfig(8, dynamic_activations=True))
    xs = [torch.randn(33 + 7 * i, 96) for i in range(4)]
    got = [None] * len(xs)

    def body(i):
        for _ in range(20):
            got[i] = kernswap.ops.quantized_linear(xs[i], qw, backend="cpu")

    ts = [threading.Thread(target=body, args=(i,)) for i in range(len(xs))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in ts), "a concurrent call hung"
    for i, x in enumerate(xs):
        ref = reference_linear(x, qw)
        assert got[i] is not None, f"thread {i} raised"
        assert_within(got[i], ref, quant_tolerance(x, qw, ref), f"thread {i}")


@pytest.mark.parametrize("parallel", ["", "pool"])
def test_nested_calls_and_fork(parallel):
    """A parallel_for inside a parallel_for runs inline (no deadlock on either backend), every index runs once, and
    a forked child (DataLoader workers) runs threaded kernels after the parent has used its threads."""
    script = textwrap.dedent("""
        import os, sys, torch
        torch.set_num_threads(2)
        from kernswap import _ext
        C = _ext.get_C()
        for n in (1, 2, 3, 17, 1000):
            for nested in (False, True):
                got = C.parallel_selftest(n, 2, nested)
                assert got == n, (n, nested, got)
        pid = os.fork()
        if pid == 0:
            ok = (C.parallel_selftest(999, 2, False) == 999 and C.parallel_selftest(99, 2, True) == 99
                  and _ext.parallel_backend().startswith("kernswap pool"))
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        print("ok", _ext.parallel_backend())
    """)
    env = dict(os.environ, KERNSWAP_PARALLEL=parallel)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]
    if parallel == "pool":
        assert "kernswap pool" in r.stdout, r.stdout
