"""Block-sparse attention helpers: mask builders (see :mod:`kernswap.sparse.masks`)."""
from .masks import (block_mask_density, block_ranges, causal_block_mask, pool_key_blocks, sink_window_block_mask,
                    topk_block_mask)

__all__ = ["causal_block_mask", "sink_window_block_mask", "topk_block_mask", "pool_key_blocks",
           "block_mask_density", "block_ranges"]
