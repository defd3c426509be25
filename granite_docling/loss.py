"""The training loss we own: summed cross-entropy over supervised tokens only, chunked over the 100k vocabulary.

``TokenLoss`` wraps the VLM so that Accelerate / DDP see one module whose forward returns
``(row_loss_sums, num_tokens)``: the summed loss of each sample (row) of the batch, so that the loop can also
report each dataset's loss, and the number of supervised tokens. The loop divides by the number of supervised
tokens summed over all micro-batches of an optimizer step and all processes, so accumulation and multi-GPU give
the gradient of one big batch.

Logits are computed only at supervised positions (answers are a small part of a page's 1-4k tokens, most of
which are image tokens), ``chunk_size`` positions at a time, each chunk recomputed in backward instead of stored:
peak logits memory is ``chunk_size x 100,352`` floats, not ``B x T x 100,352``. ``recompute=False`` stores every
chunk's logits for backward instead: ~1/4 less output-layer work, for a batch where that memory is no concern
(small models on a CPU, where the 100k-token output layer is most of a step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from granite_docling.data.encoding import IGNORE_INDEX
from granite_docling.model import unwrap_peft


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets for next-token prediction: position t predicts ``labels[t + 1]``; the last position predicts nothing.

    (B, T) -> (B, T). The one and only shift in this codebase.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _chunk_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.T).float()  # (n, V), float32 for a stable log-softmax
    return F.cross_entropy(logits, targets, reduction="none")  # (n,)


def row_cross_entropy(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    output_weight: torch.Tensor,
    chunk_size: int = 2048,
    recompute: bool = True,
) -> tuple[torch.Tensor, int]:
    """(per-row sums of next-token cross-entropy over supervised positions (B,) float32, number of positions).

    hidden: (B, T, H) last hidden states; labels: (B, T) unshifted, IGNORE_INDEX where unsupervised;
    output_weight: (V, H) the (tied) LM head; recompute: each chunk's logits recomputed in backward, not stored.
    """
    targets = shift_labels(labels)
    keep = targets != IGNORE_INDEX
    selected = hidden[keep]
    selected_targets = targets[keep]  # (N, H), (N,)
    row_sums = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
    if selected_targets.numel() == 0:
        return row_sums + hidden.sum() * 0.0, 0  # keeps the graph connected, so every process still runs backward
    rows = keep.nonzero()[:, 0]  # (N,) the row of each supervised position, in hidden[keep]'s order
    for start in range(0, selected.shape[0], chunk_size):
        end = start + chunk_size
        chunk = (selected[start:end], output_weight, selected_targets[start:end])
        if recompute:
            losses = checkpoint(_chunk_cross_entropy, *chunk, use_reentrant=False)
        else:
            losses = _chunk_cross_entropy(*chunk)
        row_sums = row_sums.index_add(0, rows[start:end], losses)
    return row_sums, int(selected_targets.numel())


def supervised_cross_entropy(
    hidden: torch.Tensor, labels: torch.Tensor, output_weight: torch.Tensor, chunk_size: int = 2048
) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over supervised positions, number of them); see row_cross_entropy."""
    row_sums, count = row_cross_entropy(hidden, labels, output_weight, chunk_size)
    return row_sums.sum(), count


class TokenLoss(torch.nn.Module):
    """``forward(**batch) -> (row_loss_sums (B,), num_tokens)`` for an Idefics3 model (plain or peft-wrapped)."""

    def __init__(self, model: torch.nn.Module, chunk_size: int = 2048, recompute: bool = True):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.recompute = recompute

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, pixel_attention_mask=None):
        core = unwrap_peft(self.model)
        outputs = core.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            pixel_attention_mask=pixel_attention_mask,
            use_cache=False,
        )
        return row_cross_entropy(
            outputs.last_hidden_state, labels, core.lm_head.weight, self.chunk_size, self.recompute
        )
