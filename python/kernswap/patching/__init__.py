"""One call patches a transformers model: ``report = kernswap.patch(model, quant="int4")``.

- :func:`patch` swaps module *instances* on the given model (never classes or module globals), returns a
  :class:`PatchReport`, and rolls back everything already swapped if anything fails part-way.
- :func:`unpatch` gives back the very same original module objects.
- :func:`save_quantized` / :func:`load_quantized` store and reload a patched model without re-quantizing
  (``model.save_pretrained(dir)`` on a patched model writes the same files; reload with ``load_quantized(dir)``).
- :func:`set_decode_path` turns the decode-layer kernel (installed with fused projections on Llama-style layers)
  off and on again, to compare it with the per-op path.

Model families are short declarations in ``kernswap/patching/families/``; unknown families get a generic rule.
"""
from .decode import set_decode_path
from .api import is_patched, patch, patch_state, unpatch
from .report import PatchReport
from .serialization import load_quantized, save_quantized

__all__ = [
    "patch",
    "unpatch",
    "is_patched",
    "patch_state",
    "PatchReport",
    "save_quantized",
    "load_quantized",
    "set_decode_path",
]
