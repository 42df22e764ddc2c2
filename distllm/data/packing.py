"""Document boundaries inside packed windows, for attention that does not cross documents.

``prepare`` packs documents back to back into one token stream with an end-of-text (EOT) token
after each, and the loader cuts fixed windows from that stream, so a window usually holds the
end of one document, a few whole ones and the start of another. By default every token attends
to all earlier tokens of its window. With ``data.document_mask`` the loader also gives each
window's document ids, from which the model builds a block-diagonal causal mask: dense
(``document_attention_mask``) for SDPA, or a FlexAttention block mask (``document_block_mask``) on
CUDA, which never materialises the (T, T) mask and lets the kernel skip blocks across documents.

A token belongs to the document its EOT closes: the EOT itself is the last token of its
document, and the token after it starts the next one.
"""

from __future__ import annotations

import torch


def document_ids(tokens: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(B, T) token ids -> (B, T) int32 index of each token's document within its window (0, 0, 1, ...)."""
    eot = (tokens == eot_id).to(torch.int32)  # (B, T)
    return torch.cumsum(eot, dim=1, dtype=torch.int32) - eot  # EOTs strictly before each position


def document_attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool mask for ``scaled_dot_product_attention``:
    query i may attend to key j iff j <= i and both are in the same document."""
    T = doc_ids.shape[1]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # (T, T)
    return (same & causal)[:, None]  # (B, 1, T, T)


_compiled_create_block_mask = None


def document_block_mask(doc_ids: torch.Tensor, block_size: int = 128):
    """(B, T) document ids -> FlexAttention ``BlockMask`` of the same restriction as
    ``document_attention_mask``: query i may attend to key j iff j <= i and both are in the same document.

    The block mask stores, per (block_size x block_size) tile, whether it is empty, full or partial
    (O((T / block_size)^2) bytes per sequence); the kernel skips empty tiles and evaluates the mask
    function only inside partial ones. On CUDA ``create_block_mask`` itself is compiled once (as
    torchtitan does), so building the mask never materialises (B, T, T) tensors either.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = doc_ids.shape

    def same_document_causal(b, h, q_idx, kv_idx):
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)

    build = create_block_mask
    if doc_ids.device.type == "cuda" and not torch.compiler.is_compiling():
        global _compiled_create_block_mask
        if _compiled_create_block_mask is None:
            _compiled_create_block_mask = torch.compile(create_block_mask)
        build = _compiled_create_block_mask
    return build(same_document_causal, B, None, T, T, device=doc_ids.device, BLOCK_SIZE=block_size)

