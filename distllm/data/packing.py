"""Document boundaries inside packed windows, for attention that does not cross documents.

``prepare`` packs documents back to back into one token stream with an end-of-text (EOT) token
after each, and the loader cuts fixed windows from that stream, so a window usually holds the
end of one document, a few whole ones and the start of another. By default every token attends
to all earlier tokens of its window. With ``data.document_mask`` the loader also gives each
window's document ids, from which the model builds a block-diagonal causal mask.

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

