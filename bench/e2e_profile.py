"""Where a decoded token's time goes in a patched SmolLM2-135M (the per-token profile of issue 10).

    python bench/e2e_profile.py                 # int4+head and int8+head, 64 new tokens, 3 rounds, 2 threads
    python bench/e2e_profile.py --quant int4    # one format

Wall-clock timers around: the whole generate() call, the model's forward, the decoder layers' decode steps, the
compiled decode-layer call inside them, and the output head, counting decode steps only (one position); the shares
are per decoded token (a prefill of the 32-token prompt, timed apart, is taken out of the total). The timers add
~1 us each. Medians of the rounds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
try:
    import kernswap  # noqa: F401
except ImportError:
    sys.path.insert(1, os.path.join(os.path.dirname(HERE), "python"))
import harness as H  # noqa: E402
from e2e_compile import prompt as decode_prompt  # noqa: E402
from e2e_peers import TorchLM  # noqa: E402


def _timed(acc, key, fn, decode_only=False):
    """fn with a timer; decode_only: count only calls on one position (input_ids or hidden states [B, 1, ...])."""
    def wrapper(*a, **k):
        x = a[0] if a else k.get("input_ids")
        if decode_only and not (isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] == 1):
            return fn(*a, **k)
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0
    return wrapper


def profile(quant: str, new_tokens: int, rounds: int):
    import kernswap
    from kernswap.nn.decode_layer import DecodeForward, _Plan
    from kernswap.testing import load_smollm2

    model = load_smollm2()
    kernswap.patch(model, quant=quant, lm_head=True, progress=False)
    prompt = decode_prompt()
    acc = {}
    model.forward = _timed(acc, "forward", model.forward, decode_only=True)
    model.lm_head.forward = _timed(acc, "lm_head", model.lm_head.forward, decode_only=True)
    from kernswap.nn import decode_model

    real_step, real_loop = DecodeForward._step, decode_model._one_call_per_layer
    DecodeForward._step = lambda self, *a, **k: _timed(acc, "layer steps", real_step)(self, *a, **k)
    # the base model's loop over the layers' prepared calls (when it takes the step, no _step runs)
    decode_model._one_call_per_layer = _timed(acc, "layer steps", real_loop)
    plans = []
    real_init = _Plan.__init__

    def init(self, *a, **k):  # time the compiled call of every plan built from here on
        real_init(self, *a, **k)
        if self.native is not None:
            native = self.native

            class Timed:
                def step(self, *sa):
                    return _timed(acc, "compiled layer calls", native.step)(*sa)
            self.native = Timed()
        plans.append(self)
    _Plan.__init__ = init
    try:
        for layer in model.model.layers:  # plans made before the timers: rebuilt on the next call
            layer.__dict__["forward"]._plan = None

        lm = TorchLM(model, 0)  # (exactly new_tokens greedy tokens)

        def gen():
            return lm.generate(prompt, new_tokens)
        gen()
        rows = []
        for _ in range(rounds):
            acc.clear()
            with torch.no_grad():  # the prefill alone, to take it out of the generate loop's share
                t0 = time.perf_counter()
                model(prompt, use_cache=True)
                pre = time.perf_counter() - t0
            acc.clear()
            t0 = time.perf_counter()
            gen()
            total = time.perf_counter() - t0
            per = {k: acc.get(k, 0.0) / (new_tokens - 1) * 1e3
                   for k in ("forward", "lm_head", "layer steps", "compiled layer calls")}
            per["total"] = (total - pre) / (new_tokens - 1) * 1e3
            rows.append(per)
    finally:
        DecodeForward._step, decode_model._one_call_per_layer = real_step, real_loop
        _Plan.__init__ = real_init
    med = {k: sorted(r[k] for r in rows)[len(rows) // 2] for k in rows[0]}
    return {"quant": f"{quant}+head", "ms_per_token": med["total"], "tok_s": 1e3 / med["total"],
            "compiled_layer_calls_ms": med["compiled layer calls"],
            "layer_python_ms": med["layer steps"] - med["compiled layer calls"],
            "lm_head_ms": med["lm_head"],
            "model_rest_ms": med["forward"] - med["layer steps"] - med["lm_head"],
            "generate_loop_ms": med["total"] - med["forward"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant", action="append", choices=["int4", "int8", "w8a8"])
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    ctx = H.make_context(threads=a.threads)
    rows = [profile(q, a.new, a.rounds) for q in (a.quant or ["int4", "int8"])]
    H.print_table(rows, list(rows[0]), title=f"per decoded token, {ctx.meta['device']['cpu']}, {a.threads} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
