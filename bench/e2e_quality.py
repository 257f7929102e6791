"""The end-to-end suite's quality table: SmolLM2-135M perplexity over the first 8,192 lee tokens (512-token
windows) and mean KL(fp32 || model) of the next-token distributions, for every kernswap format x method and for
the peers, in one run on the same tokens, with the time each took to quantize and its stored bits per weight.

    python bench/e2e_quality.py                  # the whole table (~40-65 min on 2 cores)
                                                 # -> results/quality-smollm2-<machine>.json
    python bench/bench_e2e.py --quality          # the same, through the end-to-end suite
    python bench/e2e_quality.py --quick          # smoke run: 1 window of 128 tokens, 3 configs (numbers meaningless)
    python bench/e2e_quality.py --tokens 2048 --config "QuantConfig(4, 128)" --config "calib:QuantConfig(4, 128)"

Formats: int8 (per channel), w8a8, w4a8 (g128), int4 g128 (symmetric), int4 g32 with float offsets (the grid of
the shipped GGUF Q4_1). Methods: rtn, mse (activation-weighted by the model's own activations on random token
ids), calib:mse (weighted by the calibration text), gptq, awq; plus GPTQ act_order and SmoothQuant (smooth=True
searches alpha). SmolLM2's 576-wide layers take group 64 where g128 does not divide them (patch reports it).
Calibration: 16 x 512 lee tokens from token 8,192 on, never the evaluated text.

Peers in the same run, when importable: torchao 0.18 int8 weight-only, int8 dynamic, int4 g64 (tinygemm and HQQ
qparams; scored through their dequantized weights, because torchao's int4 CPU kernel takes ~40 s per 512-token
window here, the same weights the kernel reads) and llama.cpp Q4_1 (the shipped file), Q8_0, Q4_0 and Q4_K_M made
from it by llama_model_quantize.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
try:
    import kernswap  # noqa: F401
except ImportError:
    sys.path.insert(1, os.path.join(os.path.dirname(HERE), "python"))
import e2e_peers as P  # noqa: E402
import harness as H  # noqa: E402

NAME = "quality"
TOKENS = 8192  # evaluated tokens (the first of the lee corpus)
WINDOW = 512
CALIB_FROM = 8192  # first calibration token: the evaluation reads only the tokens before it
CALIB_SEQUENCES = 16  # x 512 tokens
CALIB_PREFIX = "calib:"  # "calib:QuantConfig(...)": patch gets the calibration text (method="mse": weighted by it)

# format -> QuantConfig arguments before the method
FORMATS = {
    "int8": "8",
    "w8a8": "8, dynamic_activations=True",
    "w4a8": "4, 128, dynamic_activations=True",
    "int4-g128": "4, 128",
    "int4-g32-fzero": "4, 32, symmetric=False, zero_point='float'",
}
METHODS = ("rtn", "mse", "calib:mse", "gptq", "awq")
# (format, method label, config): the variants beyond format x method
EXTRAS = (
    ("int4-g128", "gptq act_order", "QuantConfig(4, 128, method='gptq', act_order=True)"),
    ("w8a8", "rtn smooth=0.5", "QuantConfig(8, dynamic_activations=True, smooth=0.5)"),
    ("w8a8", "rtn smooth", "QuantConfig(8, dynamic_activations=True, smooth=True)"),
    ("w4a8", "mse smooth", "QuantConfig(4, 128, dynamic_activations=True, smooth=True)"),
)
QUICK = (("int8", "rtn", "QuantConfig(8)"), ("int4-g128", "mse", "QuantConfig(4, 128)"),
         ("int4-g128", "calib:mse", "calib:QuantConfig(4, 128)"))
TORCHAO_QUALITY = ("torchao-int8wo", "torchao-int8dyn", "torchao-int4", "torchao-int4-hqq")
LLAMA_CPP_QUALITY = ("Q4_1", "Q8_0", "Q4_0", "Q4_K_M")


def grid() -> List[Tuple[str, str, str]]:
    """(format, method, config expression) of every kernswap variant of the table."""
    out = []
    for fmt, args in FORMATS.items():
        for m in METHODS:
            calib = m.startswith(CALIB_PREFIX)
            method = m[len(CALIB_PREFIX):] if calib else m
            out.append((fmt, m, f"{CALIB_PREFIX if calib else ''}QuantConfig({args}, method='{method}')"))
    return out + list(EXTRAS)


class Scorer:
    """Perplexity and KL(reference || model) over fixed windows; the reference model's log-probabilities are
    computed once and kept (16 windows x 511 positions x 49,152 tokens ~ 1.6 GB), so models are scored one at a
    time; the reference itself is scored from them (KL 0)."""

    def __init__(self, reference, ids: torch.Tensor, window: int):
        self.reference = reference
        self.windows = [ids[:, s:s + window] for s in range(0, ids.shape[1] - window + 1, window)]
        self.ref = [reference.logprobs(x) for x in self.windows]
        self.tokens = sum(x.shape[1] - 1 for x in self.windows)

    def score(self, lm) -> Dict[str, float]:
        nll = kl = 0.0
        for x, ref in zip(self.windows, self.ref):
            logp = ref if lm is self.reference else lm.logprobs(x)
            nll += -logp.gather(-1, x[:, 1:].unsqueeze(-1)).sum().item()
            if lm is not self.reference:
                kl += (ref.exp() * (ref - logp)).sum().item()
        return {"ppl": math.exp(nll / self.tokens), "kl": kl / self.tokens, "tokens": self.tokens}


def bits_per_weight(model) -> float:
    """Stored bits per weight of the model's quantized linear layers: kernswap's packed codes, scales and
    zero-points (padding included, biases not), or a tensor subclass's inner tensors (torchao)."""
    from kernswap.nn import QuantLinear

    stored = weights = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            qw = m.qweight
            stored += sum(t.numel() * t.element_size() for t in (qw.packed, qw.scale, qw.zero) if t is not None)
            weights += m.in_features * m.out_features
        elif isinstance(m, torch.nn.Linear) and type(m.weight) not in (torch.Tensor, torch.nn.Parameter):
            names, _ = m.weight.__tensor_flatten__()
            stored += sum(getattr(m.weight, n).numel() * getattr(m.weight, n).element_size() for n in names)
            weights += m.weight.shape[0] * m.weight.shape[1]
    return 8 * stored / weights if weights else float("nan")


def dequantized(model) -> None:
    """Replace each tensor-subclass Linear weight by the float matrix its own kernel multiplies with (an identity
    through F.linear), in place."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and type(m.weight) not in (torch.Tensor, torch.nn.Parameter):
            k = m.weight.shape[1]
            with torch.no_grad():
                w = F.linear(torch.eye(k), m.weight).t().contiguous()
            m.weight = torch.nn.Parameter(w, requires_grad=False)


def kernswap_rows(base, scorer: Scorer, configs: Sequence[Tuple[str, str, str]], calib: List[torch.Tensor]):
    import kernswap
    from kernswap.formats.scale_search import CALIBRATED
    from kernswap.patching.report import module_memory

    for fmt, method, spec in configs:
        expr = spec[len(CALIB_PREFIX):] if spec.startswith(CALIB_PREFIX) else spec
        cfg = eval(expr, {"QuantConfig": kernswap.QuantConfig})  # noqa: S307 - this file's grid or the command line
        needs = cfg.smooth is not None or cfg.method in CALIBRATED or spec.startswith(CALIB_PREFIX)
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        rep = kernswap.patch(m, quant=cfg, progress=False, keep_originals=False,
                             calibration=calib if needs else None)
        seconds = time.perf_counter() - t0
        notes = "; ".join(n for n in rep.notes if n.startswith(("smoothing", "awq", "quantization method")))
        print(f"[quality] {spec}: patched in {seconds:.1f} s; {notes}", file=sys.stderr)
        row = {"variant": f"{fmt} {method}", "format": fmt, "method": method, "config": spec, "peer": None,
               "calibrated": bool(needs), "quantize_s": seconds, "bits_per_weight": bits_per_weight(m),
               **scorer.score(P.TorchLM(m, module_memory(m))), "notes": notes}
        print(f"[quality] {row['variant']}: ppl {row['ppl']:.3f} KL {row['kl']:.5f}", file=sys.stderr)
        del m
        yield row


def torchao_rows(base, scorer: Scorer):
    from kernswap.patching.report import module_memory

    for name in TORCHAO_QUALITY:
        t0 = time.perf_counter()
        try:
            m = P.torchao_model(base, name)
        except Exception as e:  # noqa: BLE001 - not installed, or no CPU path: the row says why
            yield {"variant": name, "peer": "missing", "why": f"{type(e).__name__}: {e}"[:200]}
            continue
        seconds = time.perf_counter() - t0
        bits = bits_per_weight(m)
        how = "kernel"
        if name.startswith("torchao-int4"):
            dequantized(m)
            how = "dequantized weights"
        yield {"variant": name, "format": name, "method": P.TORCHAO_METHOD[name], "peer": "torchao",
               "quantize_s": seconds, "bits_per_weight": bits, "scored_through": how,
               **scorer.score(P.TorchLM(m, module_memory(m)))}
        del m


def llama_cpp_rows(scorer: Scorer, threads: int):
    from kernswap.testing.models import smollm2_gguf_path

    models, why = P.llama_cpp_models(str(smollm2_gguf_path()), threads, n_ctx=WINDOW, types=LLAMA_CPP_QUALITY)
    for t in LLAMA_CPP_QUALITY:
        name = f"llama.cpp-{t}"
        if name in why:
            yield {"variant": name, "peer": "missing", "why": why[name]}
            continue
        lm = models.pop(name)
        yield {"variant": name, "format": t, "method": "llama.cpp", "peer": "llama.cpp",
               "quantize_s": P.LLAMA_CPP_QUANTIZE_S.get(t), "bits_per_weight": P.gguf_bits_per_weight(lm.path),
               **scorer.score(lm)}
        del lm


def run(ctx: H.Context, configs: Optional[Sequence[Tuple[str, str, str]]] = None, tokens: Optional[int] = None,
        peers: bool = True) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    from kernswap.patching.report import module_memory
    from kernswap.testing import SkipReason, lee_corpus_text, load_smollm2, load_smollm2_tokenizer

    torch.manual_seed(0)
    window = 128 if ctx.quick else WINDOW
    tokens = tokens or (window if ctx.quick else TOKENS)
    if tokens > CALIB_FROM:
        raise SystemExit(f"tokens must be <= {CALIB_FROM} (the calibration text starts there)")
    try:
        base = load_smollm2()
        ids = load_smollm2_tokenizer()(lee_corpus_text(), return_tensors="pt").input_ids
    except SkipReason as e:
        return [], [{"target": "quality", "detail": str(e), "value": None, "need": 0, "unit": "x", "status": "n/a"}]
    n_calib = 2 if ctx.quick else CALIB_SEQUENCES
    calib = [ids[0, CALIB_FROM + WINDOW * i:CALIB_FROM + WINDOW * (i + 1)] for i in range(n_calib)]
    fp32 = P.TorchLM(base, module_memory(base))
    scorer = Scorer(fp32, ids[:, :tokens], window)
    rows = [{"variant": "fp32", "format": "fp32", "method": "-", "peer": None, "bits_per_weight": 32.0,
             "quantize_s": 0.0, **scorer.score(fp32)}]
    rows += list(kernswap_rows(base, scorer, configs or (QUICK if ctx.quick else grid()), calib))
    if peers:
        rows += list(torchao_rows(base, scorer)) + list(llama_cpp_rows(scorer, ctx.threads))
    ref = rows[0]["ppl"]
    for r in rows:
        if r.get("ppl") is not None:
            r["dppl_pct"] = 100 * (r["ppl"] / ref - 1)
        r.update(threads=ctx.threads, device=ctx.meta.get("device", {}).get("cpu"),
                 isa=ctx.meta.get("kernswap_cpu_backend"))
    return rows, targets(rows)


def targets(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Issue 11's targets: delta perplexity at most the need (unit '%'), and ratios of delta perplexity (unit 'x',
    peer / kernswap: above 1 means kernswap keeps more of the model)."""
    def best(fmt, methods=None, calibrated=None):
        c = [r for r in rows if r.get("format") == fmt and not r.get("peer") and "dppl_pct" in r
             and (methods is None or r["method"] in methods) and (calibrated is None or r["calibrated"] == calibrated)]
        return min(c, key=lambda r: r["dppl_pct"]) if c else None

    def at_most(name, r, need):
        v = None if r is None else r["dppl_pct"]
        st = "n/a" if v is None else ("PASS" if v <= need else "MISS")
        return {"target": name, "detail": f"{r['variant'] if r else '-'} delta ppl <= {need}%",
                "value": None if v is None else v / 100, "need": need / 100, "unit": "%", "status": st}

    def better(name, mine, peer_names):
        peers = [r for r in rows if r["variant"] in peer_names and "dppl_pct" in r]
        if mine is None or not peers:
            return H.target(name, None, 1.0, "a side did not run")
        p = min(peers, key=lambda r: r["dppl_pct"])
        # ratio of the perplexity increases; a peer at or below fp32 cannot be beaten by a ratio
        v = (p["dppl_pct"] / mine["dppl_pct"]) if mine["dppl_pct"] > 0 else math.inf
        return H.target(name, v, 1.0, f"{p['variant']} {p['dppl_pct']:+.2f}% / {mine['variant']} "
                                      f"{mine['dppl_pct']:+.2f}%")

    g128 = best("int4-g128")
    out = [at_most("int4 g32 float offsets", best("int4-g32-fzero"), 0.5),
           at_most("int4 g128 mse (no data)", best("int4-g128", ("mse",)), 25.0),
           at_most("int4 g128 best calibrated", best("int4-g128", calibrated=True), 12.0),
           at_most("w8a8 with smoothing", best("w8a8", ("rtn smooth", "rtn smooth=0.5")), 1.0),
           at_most("w4a8 best method", best("w4a8"), 15.0),
           at_most("int8 (rtn)", best("int8", ("rtn",)), 0.3),
           better("int4 g128 vs torchao's best int4", g128, ("torchao-int4", "torchao-int4-hqq")),
           better("int4 g128 vs llama.cpp Q4_0", g128, ("llama.cpp-Q4_0",))]
    patch = next((r for r in rows if r.get("variant") == "int4-g128 mse"), None)
    out.append(H.target("int4 default patch time <= 10 s", 10.0 / patch["quantize_s"] if patch else None, 1.0,
                        f"{patch['quantize_s']:.1f} s" if patch else "not run"))
    return out


def print_results(rows: List[Dict[str, Any]], tgts: List[Dict[str, Any]], file: Any = None) -> None:
    file = file or sys.stdout
    if rows:
        print(f"\nSmolLM2-135M quality: {rows[0]['tokens']} predicted lee tokens, fp32 ppl {rows[0]['ppl']:.3f}; "
              f"{rows[0]['device']}, {rows[0]['threads']} threads", file=file)
        head = ("variant", "ppl", "d ppl", "KL", "bits/w", "quantize s")
        lines = [head]
        for r in rows:
            if r.get("peer") == "missing":
                lines.append((r["variant"], "not measured: " + r["why"][:70], "", "", "", ""))
                continue
            lines.append((r["variant"], _f(r.get("ppl"), ".3f"), _f(r.get("dppl_pct"), "+.2f", "%"),
                          _f(r.get("kl"), ".4f"), _f(r.get("bits_per_weight"), ".2f"), _f(r.get("quantize_s"), ".1f")))
        w = [max(len(line[i]) for line in lines) for i in range(len(head))]
        for j, line in enumerate(lines):
            print("  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(line)).rstrip(), file=file)
            if j == 0:
                print("  ".join("-" * x for x in w), file=file)
    for t in tgts:
        if t["unit"] == "%":
            v = "n/a" if t["value"] is None else f"{t['value'] * 100:+.2f}%"
            print(f"  {t['status']:<4}  {t['target']}: {v} ({t['detail']})", file=file)
    H.print_targets([t for t in tgts if t["unit"] != "%"], file=file)


def markdown(rows: List[Dict[str, Any]]) -> str:
    """The README's tables from a results file's rows: kernswap's formats x methods (delta perplexity, KL,
    quantize seconds; the EXTRAS in one more column), then the peers."""
    by = {(r.get("format"), r.get("method")): r for r in rows if not r.get("peer")}

    def cell(r, label=""):
        return f"{label}{r['dppl_pct']:+.2f}% (KL {r['kl']:.3f}, {r['quantize_s']:.0f} s)"

    out = ["| format (bits/weight) | " + " | ".join(METHODS) + " | more |", "|---" * (len(METHODS) + 2) + "|"]
    for fmt in FORMATS:
        cells = [cell(by[(fmt, m)]) if (fmt, m) in by else "" for m in METHODS]
        more = [cell(by[(f, m)], f"{m}: ") for f, m, _ in EXTRAS if f == fmt and (f, m) in by]
        if any(cells) or more:
            bits = next((r["bits_per_weight"] for (f, _), r in by.items() if f == fmt), float("nan"))
            out.append(f"| {fmt} ({bits:.2f}) | " + " | ".join(cells) + " | " + "; ".join(more) + " |")
    out += ["", "| peer | bits/weight | d ppl | KL | quantize s |", "|---|---|---|---|---|"]
    for r in rows:
        if r.get("peer") == "missing":
            out.append(f"| {r['variant']} | not measured: {r['why'][:80]} | | | |")
        elif r.get("peer"):
            q = r.get("quantize_s")
            out.append(f"| {r['variant']} ({r['method']}) | {r['bits_per_weight']:.2f} | {r['dppl_pct']:+.2f}% | "
                       f"{r['kl']:.3f} | {'-' if q is None else format(q, '.1f')} |")
    return "\n".join(out)


def _f(v, spec, suffix="") -> str:
    return "-" if v is None else format(v, spec) + suffix


def self_check() -> None:
    """Seconds: scoring, bits per weight and the targets on a tiny random Llama (no real weights needed)."""
    import kernswap
    from kernswap.testing.tiny import tiny_model

    base = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 64))
    scorer = Scorer(P.TorchLM(base, 1), ids, 32)
    assert scorer.score(P.TorchLM(base, 1))["kl"] == 0
    m = copy.deepcopy(base)
    kernswap.patch(m, quant="int8", progress=False)
    s = scorer.score(P.TorchLM(m, 1))
    assert s["kl"] > 0 and s["ppl"] > 1 and 8 < bits_per_weight(m) < 9
    assert len(grid()) == len(FORMATS) * len(METHODS) + len(EXTRAS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=None, help=f"evaluated tokens (default {TOKENS})")
    ap.add_argument("--config", action="append", help="a QuantConfig(...) expression, 'calib:' for calibration "
                                                      "text (repeatable; replaces the grid, no peers)")
    ap.add_argument("--out", default=None, help="results folder (default bench/results; --quick or --config: "
                                                "a temp folder)")
    ap.add_argument("--markdown", default=None, metavar="RESULTS", help="print a results file as the README's "
                                                                        "tables and exit")
    a = ap.parse_args(argv)
    if a.markdown:
        import json

        with open(a.markdown) as f:
            print(markdown(json.load(f)["rows"]))
        return 0
    ctx = H.make_context(threads=a.threads, quick=a.quick)
    configs = [("custom", c, c) for c in a.config] if a.config else None
    t0 = time.perf_counter()
    rows, tgts = run(ctx, configs, a.tokens, peers=not a.config)
    print_results(rows, tgts)
    if rows:
        import tempfile

        out = a.out or (os.path.join(tempfile.gettempdir(), "kernswap-bench-quick") if a.quick or a.config
                        else os.path.join(HERE, "results"))
        path = os.path.join(out, f"quality-smollm2-{H.machine_name(ctx)}.json")
        H.write_json(path, ctx, rows, tgts, NAME, time.perf_counter() - t0)
        print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
