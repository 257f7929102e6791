"""patch(model, attention=...): block-sparse attention through transformers' attention registry."""
import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

import kernswap  # noqa: E402
from kernswap import SparseAttentionConfig  # noqa: E402
from kernswap.nn import sparse_attention as sa  # noqa: E402
from kernswap.testing.tiny import TINY_FAMILIES, tiny_model  # noqa: E402

DENSE_EQUIV = SparseAttentionConfig(block_size=16, sink_blocks=1, local_blocks=1, density=1.0, min_seq_len=0)
SPARSE = SparseAttentionConfig(block_size=16, sink_blocks=1, local_blocks=1, density=0.3, min_seq_len=0)


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls that take the block-sparse path."""
    calls = []
    real = sa.block_sparse_attention

    def wrapped(q, k, v, mask, **kw):
        calls.append((tuple(q.shape), tuple(k.shape), tuple(mask.shape)))
        return real(q, k, v, mask, **kw)

    monkeypatch.setattr(sa, "block_sparse_attention", wrapped)
    return calls


def _model(family="llama", **kw):
    return tiny_model(family, head_dim=64, hidden_size=256, **kw)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_density_one_equals_dense(family, spy):
    model = _model(family)
    ids = torch.randint(3, 256, (2, 70))
    with torch.no_grad():
        ref = model(ids).logits
        report = kernswap.patch(model, attention=DENSE_EQUIV, progress=False)
        out = model(ids).logits
    assert len(spy) == 2  # both layers ran the block-sparse op
    assert [r for r in report.swapped if r[1] == "attention"]
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    kernswap.unpatch(model)
    assert model.config._attn_implementation != sa.ATTN_NAME
    assert not hasattr(model.model.layers[0].self_attn, sa.MODULE_ATTR)


def test_sparse_changes_output_and_is_what_the_mask_says(spy):
    model = _model()
    ids = torch.randint(3, 256, (1, 96))
    with torch.no_grad():
        ref = model(ids).logits
        kernswap.patch(model, attention=SPARSE, progress=False)
        out = model(ids).logits
    assert spy and spy[0][2] == (1, 4, 6, 6)
    assert not torch.allclose(out, ref, atol=1e-3)  # pruned blocks really are pruned
    assert torch.allclose(out[:, :16], ref[:, :16], atol=1e-5)  # the first block sees everything it can


def test_generate_with_kv_cache_matches_dense_at_full_density(spy):
    model = _model()
    ids = torch.randint(3, 256, (1, 40))
    every_block = dataclasses.replace(DENSE_EQUIV, density=0.999)  # keeps all (ceil) but chooses them per step
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False)
        kernswap.patch(model, attention=every_block, progress=False)
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, ref)
    assert any(q[2] == 1 for q, _, _ in spy)  # decode steps (one query vs the cache) took the sparse path


def test_decode_key_pool_tracks_the_cache():
    torch.manual_seed(0)
    pool = sa._KeyPool()
    k = torch.randn(1, 2, 70, 64)
    from kernswap.sparse import pool_key_blocks

    assert torch.allclose(pool.means(k, 16), pool_key_blocks(k, 16), atol=1e-6)
    k2 = torch.cat([k, torch.randn(1, 2, 30, 64)], dim=2)  # the cache grew
    assert torch.allclose(pool.means(k2, 16), pool_key_blocks(k2, 16), atol=1e-6)
    k3 = torch.randn(1, 2, 100, 64)  # a new sequence of the same length: must not reuse stale sums
    assert torch.allclose(pool.means(k3, 16), pool_key_blocks(k3, 16), atol=1e-6)


def test_padding_and_short_sequences_run_dense(spy):
    model = _model()
    ids = torch.randint(3, 256, (2, 40))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding (batched generation)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        kernswap.patch(model, attention=SPARSE, progress=False)
        out = model(ids, attention_mask=mask).logits
    assert not spy
    torch.testing.assert_close(out, ref)
    kernswap.unpatch(model)
    kernswap.patch(model, attention=SparseAttentionConfig(min_seq_len=1024), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model(ids).logits)
    assert not spy


def test_failure_later_in_patch_restores_attention(monkeypatch):
    model = _model()
    from kernswap.patching import attention as pa

    def boom(self, cfgs):
        def run():
            raise RuntimeError("boom")
        return run

    before = model.config._attn_implementation
    monkeypatch.setattr(pa.AttentionRule, "_switch", staticmethod(lambda cfgs: boom(None, cfgs)))
    with pytest.raises(RuntimeError, match="boom"):
        kernswap.patch(model, attention="sparse", progress=False)
    assert model.config._attn_implementation == before
    assert not any(hasattr(m, sa.MODULE_ATTR) for m in model.modules())
    assert kernswap.patching.patch_state(model) is None


def test_with_quantization_and_repeat_patch_is_noop():
    model = _model()
    r1 = kernswap.patch(model, quant="int8", attention="sparse", progress=False)
    assert r1.requested["attention"].startswith("sparse-b64")
    assert kernswap.patch(model, quant="int8", attention="sparse", progress=False) is r1
    with pytest.raises(RuntimeError, match="already patched"):
        kernswap.patch(model, quant="int8", attention=SPARSE, progress=False)


def test_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match=r"attention must be .*\['dense', 'sparse'\], got 'flash'"):
        kernswap.patch(model, attention="flash")
    with pytest.raises(ValueError, match="density"):
        SparseAttentionConfig(density=1.5)
    with pytest.raises(ValueError, match="block_size"):
        SparseAttentionConfig(block_size=40)


def test_unknown_family_is_refused():
    from torch import nn

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

    with pytest.raises(NotImplementedError, match="declared model family"):
        kernswap.patch(Toy(), attention="sparse", progress=False)


def test_scalar_cpu_tier_leaves_attention_to_sdpa(spy):
    """Where kernswap's CPU attention would run its portable scalar tier (slower than torch's SDPA), `auto`
    runs transformers' dense SDPA instead: the block-sparse op is not called and the output is the dense one;
    a forced backend="cpu" still runs kernswap's kernel."""
    from kernswap import _ext

    if "scalar" not in _ext.supported_isas():
        pytest.skip(_ext.cpu_ext_reason() or "no scalar tier")
    from conftest import use_isa

    model = _model()
    ids = torch.randint(3, 256, (1, 96))
    with torch.no_grad(), use_isa("scalar"):
        ref = model(ids).logits
        kernswap.patch(model, attention=SPARSE, progress=False)
        out = model(ids).logits
        assert not spy
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
        kernswap.unpatch(model)
        kernswap.patch(model, attention=SparseAttentionConfig(**{**SPARSE.__dict__, "backend": "cpu"}),
                       progress=False)
        model(ids)
        assert spy


def test_unpatch_after_decode_leaves_no_key_pool(spy):
    """Decoding with sparse attention gives each attention module a key pool; unpatch removes it with the rest."""
    model = _model()
    ids = torch.randint(3, 256, (1, 40))
    with torch.no_grad():
        kernswap.patch(model, attention=SPARSE, progress=False)
        model.generate(ids, max_new_tokens=4, do_sample=False)
    assert any(q[2] == 1 for q, _, _ in spy)  # decode steps took the sparse path (and built the pools)
    assert any(sa.POOL_ATTR in m.__dict__ for m in model.modules())
    kernswap.unpatch(model)
    left = [n for n, m in model.named_modules() if sa.POOL_ATTR in m.__dict__ or sa.MODULE_ATTR in m.__dict__]
    assert not left, left


@pytest.mark.parametrize("amx", [True, False])
def test_amx_cpu_leaves_dense_enough_half_attention_to_sdpa(spy, monkeypatch, amx):
    """Where torch's SDPA runs bf16/fp16 on AMX (faster than kernswap's kernel from density 0.25), `auto` runs dense
    SDPA for those dtypes at such densities: the block-sparse op is not called and the output is the dense one.
    fp32, lower densities, CPUs without AMX and a forced backend still take kernswap's kernel."""
    monkeypatch.setattr(sa, "torch_sdpa_uses_amx", lambda: amx)
    ids = torch.randint(3, 256, (1, 96))
    model = _model(dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(ids).logits
        report = kernswap.patch(model, attention=SPARSE, progress=False)  # density 0.3
        out = model(ids).logits
    assert bool(spy) is not amx
    assert any("AMX" in n for n in report.notes) is amx
    if amx:
        torch.testing.assert_close(out, ref)
    kernswap.unpatch(model)
    spy.clear()
    with torch.no_grad():
        kernswap.patch(model, attention=SparseAttentionConfig(**{**SPARSE.__dict__, "density": 0.1}), progress=False)
        model(ids)
        assert spy  # sparse enough: kernswap's kernel
        kernswap.unpatch(model)
        spy.clear()
        kernswap.patch(model, attention=SparseAttentionConfig(**{**SPARSE.__dict__, "backend": "cpu"}), progress=False)
        model(ids)
        assert spy  # forced
        kernswap.unpatch(model)
        spy.clear()
        fp32 = _model()
        kernswap.patch(fp32, attention=SPARSE, progress=False)
        fp32(ids)
        assert spy  # fp32 has no AMX path in torch


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_dense_shortcut_prefill_through_the_kernel(family, spy):
    """attention="dense": density 1 from 256 keys on. A 260-token prefill runs kernswap's kernel on every layer with
    an all-blocks mask and gives the dense model's logits; a shorter prompt and the decode steps run SDPA."""
    cfg = SparseAttentionConfig.from_any(" Dense ")
    assert (cfg.density, cfg.min_seq_len) == (1.0, 256)
    model = _model(family)
    n_layers = model.config.num_hidden_layers
    long_ids, short_ids = torch.randint(3, 256, (1, 260)), torch.randint(3, 256, (1, 255))
    with torch.no_grad():
        ref_long, ref_short = model(long_ids).logits, model(short_ids).logits
        ref_gen = model.generate(long_ids, max_new_tokens=5, do_sample=False)
        report = kernswap.patch(model, attention="dense", progress=False)
        assert report.requested["attention"] == cfg.name
        out_long = model(long_ids).logits
        assert len(spy) == n_layers and all(m == (1, 1, 5, 5) for _, _, m in spy)
        torch.testing.assert_close(out_long, ref_long, atol=2e-5, rtol=2e-5)
        spy.clear()
        torch.testing.assert_close(model(short_ids).logits, ref_short, atol=0, rtol=0)
        assert not spy
        out_gen = model.generate(long_ids, max_new_tokens=5, do_sample=False)
    assert len(spy) == n_layers and all(q[2] == 260 for q, _, _ in spy)  # the prefill only
    assert torch.equal(out_gen, ref_gen)
    kernswap.unpatch(model)
    assert not any(sa.MODULE_ATTR in m.__dict__ for m in model.modules())
