"""LoRA on an embedding table: the lookup of A's columns replaces the down-projection."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import functional as LF
from .layers import LoraLayer
from .mixed import mixed_weights


class LoraEmbedding(LoraLayer):
    """nn.Embedding (weight [num, dim]). A: [r, num], B: [dim, r]; as in PEFT, A starts at
    zero and B random (the rows of A are looked up, so A plays the input projection)."""

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.fan_in, self.fan_out = base_layer.num_embeddings, base_layer.embedding_dim

    def _init_pair(self, A: Tensor, B: Tensor, r: int, init: bool | str) -> None:
        nn.init.normal_(B)
        if init is False:
            nn.init.normal_(A, std=0.02)
        else:
            nn.init.zeros_(A)

    def lora_delta(self, name: str) -> Tensor:
        return LF.delta_weight(self.A_matrix(name), self.B_matrix(name), self.scaling[name]).t()

    def lora_term(self, ids: Tensor, out: Tensor, name: str) -> Tensor:
        # The lookup replaces x·Aᵀ: h = A[:, ids]ᵀ -> [..., r]; no dropout on token ids.
        e = self.base_layer
        h = F.embedding(
            ids,
            self.A_matrix(name).to(out.dtype).t(),
            e.padding_idx,
            e.max_norm,
            e.norm_type,
            e.scale_grad_by_freq,
            e.sparse,
        )
        return LF.lora_forward_h(h, out, self.B_matrix(name).to(out.dtype), self.scaling[name])

    def _mixed_forward(self, ids: Tensor, out: Tensor) -> Tensor:
        At, Bt, index = mixed_weights(self, ids.shape[0], ids.device, out.dtype)  # [n+1, num, r], [n+1, r, dim]
        rows = index.view(-1, *([1] * (ids.dim() - 1))).expand_as(ids)
        h = At[rows, ids]  # [b, ..., r]
        delta = torch.bmm(h.reshape(ids.shape[0], -1, h.shape[-1]), Bt.index_select(0, index))
        return out + delta.view(out.shape)
