"""The language models the end-to-end suite measures, behind one small interface, and the peers users would pick
instead of kernswap: torchao's CPU configs on the same transformers model, and llama.cpp (llama-cpp-python) on the
same weights (the shipped GGUF and Q8_0 / Q4_0 requantized from it). Peers are optional: each is measured when its
package imports, and its rows say why when it does not.

Every model answers the same calls on the same token ids:
  logprobs(x)        log-softmax of the next-token logits for positions 0..T-2 of x ([1, T] ids), fp32
  prefill(x)         run x through the model from an empty cache
  generate(p, n)     n greedy tokens after prompt p ([B, T] ids) -> [B, n] ids
  weight_bytes       bytes of weights read per decoded token (the embedding table counts only when it is also the
                     output head)
"""
from __future__ import annotations

import copy
import ctypes
import os
import sys
import tempfile
import time
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F


def greedy_config(model, n: int, cache_implementation: Optional[str] = None):
    """``model``'s generation config for exactly n greedy new tokens, the way llama.cpp's rows decode: no end
    token, so nothing stops early and transformers adds no min-new-tokens processors (they scan the whole
    vocabulary twice per token: ~0.7 ms of an ~8-10 ms SmolLM2 token on the Xeon). Built before any timing.
    cache_implementation (e.g. "static") overrides the model's own."""
    gc = copy.deepcopy(model.generation_config)
    gc.update(eos_token_id=None, max_new_tokens=n, min_new_tokens=None, do_sample=False, pad_token_id=0,
              use_cache=True)
    if cache_implementation is not None:
        gc.cache_implementation = cache_implementation
    return gc


class TorchLM:
    """A transformers causal LM (patched or not)."""

    kind = "torch"

    def __init__(self, model, param_bytes: int, cache_implementation: Optional[str] = None):
        self.model = model.eval()
        self.param_bytes = param_bytes
        self.cache_implementation = cache_implementation  # greedy_config's override
        self._greedy = {}  # new tokens -> generation config (greedy_config)
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        emb_w = getattr(emb, "weight", None)
        tied = head is not None and getattr(head, "weight", None) is emb_w
        # the lookup reads one row of the table; a tied head reads all of it
        self.weight_bytes = param_bytes - (0 if tied or emb_w is None else emb_w.numel() * emb_w.element_size())

    @torch.no_grad()
    def logprobs(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.model(x, use_cache=False).logits[:, :-1].float(), dim=-1)

    @torch.no_grad()
    def prefill(self, x: torch.Tensor) -> None:
        self.model(x, use_cache=True, logits_to_keep=1)  # prompt processing: the next token's logits only

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, n: int) -> torch.Tensor:
        gc = self._greedy.get(n)
        if gc is None:  # (made on the untimed first call)
            gc = self._greedy[n] = greedy_config(self.model, n, self.cache_implementation)
        out = self.model.generate(prompt, generation_config=gc)
        return out[:, prompt.shape[1]:]


# ------------------------------------------------------------------------------------------------ torchao
TORCHAO_CONFIGS = ("torchao-int8wo", "torchao-int8dyn", "torchao-int4-hqq")
# how each torchao config chooses its quantization parameters (the quality table's method column)
TORCHAO_METHOD = {"torchao-int8wo": "rtn", "torchao-int8dyn": "rtn", "torchao-int4": "tinygemm qparams",
                  "torchao-int4-hqq": "hqq"}


def torchao_config(name: str):
    """torchao 0.18's CPU config called ``name``: int8 weight-only, int8 dynamic activations + int8 weights, int4
    weight-only with group 64 (SmolLM2's 576-wide layers have no 128-groups) and tinygemm or HQQ qparams."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    if name.startswith("torchao-int4"):
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=64, int4_choose_qparams_algorithm=(
            "hqq" if name.endswith("-hqq") else "tinygemm"))
    return {"torchao-int8wo": Int8WeightOnlyConfig, "torchao-int8dyn": Int8DynamicActivationInt8WeightConfig}[name]()


def torchao_model(base, name: str):
    """A copy of ``base`` quantized by torchao's config ``name``; raises when torchao is missing or the config has
    no CPU kernel (checked by one generated token)."""
    from torchao.quantization import quantize_

    m = copy.deepcopy(base)
    quantize_(m, torchao_config(name))
    TorchLM(m, 0).generate(torch.zeros(1, 4, dtype=torch.long), 1)
    return m


def torchao_models(base, module_memory: Callable, skip=()) -> Tuple[Dict[str, TorchLM], Dict[str, str]]:
    """The TORCHAO_CONFIGS on copies of ``base``. Returns (name -> model, name -> why it could not be built);
    ``skip``: configs left out of this run."""
    out: Dict[str, TorchLM] = {}
    why: Dict[str, str] = {}
    for name in TORCHAO_CONFIGS:
        if name in skip:
            why[name] = "measured with --full only (slow on the CPU)"
            continue
        try:
            m = torchao_model(base, name)
            out[name] = TorchLM(m, module_memory(m))
        except Exception as e:  # noqa: BLE001 - not installed, a build that does not match this torch, or no CPU path
            why[name] = f"{type(e).__name__}: {e}"[:200]
            print(f"[e2e] {name} not measured: {why[name]}", file=sys.stderr)
    return out, why


# ---------------------------------------------------------------------------------------------- llama.cpp
LLAMA_CPP_TYPES = ("Q4_1", "Q8_0", "Q4_0")  # the shipped file's type first
LLAMA_CPP_QUANTIZE_S: Dict[str, float] = {}  # seconds llama_model_quantize took per type (when run, not cached)


class LlamaCppLM:
    """A GGUF through llama-cpp-python: batch 1 only (``generate`` takes one prompt row). Speed runs on a context
    that keeps the last logits only (llama.cpp's own prompt processing); perplexity on a second one, made on first
    use, that keeps every position's."""

    kind = "llama.cpp"

    def __init__(self, path: str, threads: int, n_ctx: int):
        self.path, self.threads, self.n_ctx = path, threads, n_ctx
        self.llm = self._open(logits_all=False)
        self._all = None
        self.param_bytes = self.weight_bytes = os.path.getsize(path)

    def _open(self, logits_all: bool):
        from llama_cpp import Llama

        return Llama(model_path=self.path, n_ctx=self.n_ctx, n_batch=min(512, self.n_ctx),
                     n_ubatch=min(512, self.n_ctx), n_threads=self.threads, n_threads_batch=self.threads,
                     logits_all=logits_all, verbose=False)

    def logprobs(self, x: torch.Tensor) -> torch.Tensor:
        if self._all is None:
            self._all = self._open(logits_all=True)
        ids = x[0].tolist()
        self._all.reset()
        self._all.eval(ids)
        scores = torch.from_numpy(self._all.scores[: len(ids) - 1].copy())
        return F.log_softmax(scores.float(), dim=-1).unsqueeze(0)

    def prefill(self, x: torch.Tensor) -> None:
        self.llm.reset()
        self.llm.eval(x[0].tolist())

    def generate(self, prompt: torch.Tensor, n: int) -> torch.Tensor:
        if prompt.shape[0] != 1:
            raise ValueError("LlamaCppLM.generate: batch 1 only")
        import numpy as np

        llm = self.llm
        llm.reset()
        llm.eval(prompt[0].tolist())
        out = []
        for _ in range(n):  # the last position's logits (this context keeps no others)
            tok = int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())
            out.append(tok)
            llm.eval([tok])
        return torch.tensor([out])


def _requantize(src: str, dst: str, ftype_name: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype_name}) returned {rc}")


_PROBE = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=int(sys.argv[2]), verbose=False)
llm.eval(list(range(1, 33)))  # a multi-token batch, then one decode step
llm.eval([5])
"""


def _probe(path: str, threads: int) -> Optional[str]:
    """Why llama.cpp cannot run ``path`` here (None when it can), found in a child process: a build that crashes
    (e.g. one compiled for CPU features this machine advertises but cannot use) must not take the bench down."""
    import subprocess

    r = subprocess.run([sys.executable, "-c", _PROBE, path, str(threads)], capture_output=True, text=True,
                       timeout=300)
    if r.returncode == 0:
        return None
    how = f"signal {-r.returncode}" if r.returncode < 0 else f"exit code {r.returncode}"
    return f"llama.cpp crashed in a probe process ({how}) on a 32-token batch; rebuild llama-cpp-python"


def gguf_bits_per_weight(path: str) -> float:
    """Stored bits per weight of a GGUF's 2-D layer tensors (blk.*: the linear layers; the embedding table and
    norms are left out, as for the other rows)."""
    from gguf import GGUFReader

    stored = weights = 0
    for t in GGUFReader(path).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            stored += int(t.n_bytes)
            weights += int(t.n_elements)
    return 8 * stored / weights if weights else float("nan")


def llama_cpp_models(gguf: str, threads: int, n_ctx: int, types=LLAMA_CPP_TYPES
                     ) -> Tuple[Dict[str, LlamaCppLM], Dict[str, str]]:
    """llama.cpp on the shipped GGUF (Q4_1, the first of ``types``) and on the other ``types`` made from it
    (cached in a temp folder). Returns (name -> model, name -> why not)."""
    names = [f"llama.cpp-{t}" for t in types]
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return {}, {n: f"llama-cpp-python not importable ({type(e).__name__}); pip install llama-cpp-python==0.3.36"
                    for n in names}
    out: Dict[str, LlamaCppLM] = {}
    why: Dict[str, str] = {}
    cache = os.path.join(tempfile.gettempdir(), "kernswap-bench-gguf")
    os.makedirs(cache, exist_ok=True)
    for t, name in zip(types, names):
        try:
            path = gguf
            if t != LLAMA_CPP_TYPES[0]:
                path = os.path.join(cache, os.path.basename(gguf).rsplit(".", 1)[0] + f"-{t}.gguf")
                if not os.path.exists(path):
                    t0 = time.perf_counter()
                    _requantize(gguf, path + ".tmp", t)
                    LLAMA_CPP_QUANTIZE_S[t] = time.perf_counter() - t0
                    os.replace(path + ".tmp", path)
            crash = _probe(path, threads)
            if crash:
                raise RuntimeError(crash)
            out[name] = LlamaCppLM(path, threads, n_ctx)
        except Exception as e:  # noqa: BLE001
            why[name] = f"{type(e).__name__}: {e}"[:200]
            print(f"[e2e] {name} not measured: {why[name]}", file=sys.stderr)
    return out, why
