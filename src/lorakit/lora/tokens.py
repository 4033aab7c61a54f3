"""New tokens: only their rows of the embedding (and of the output head) train, and only those
rows are saved (PEFT's `trainable_token_indices`), not the whole [vocab, dim] matrix.

A chat template or a task that adds special tokens (`<tool>`, `<sep>`) needs embeddings for
them; training the whole table for that costs vocab·dim parameters and hundreds of MB per
adapter. Here each adapter holds rows: [n, dim] for its n token ids, initialised from the
table, and the layer computes

    embedding:  E[ids] with E[indices] replaced by rows       (a lookup, then a select)
    output head: x·Wᵀ with its logits at `indices` from x·rowsᵀ

so no [vocab, dim] copy is made per step. When the head shares the embedding's weight (tied),
it reads the embedding's rows (one set, as PEFT ties them). Saved under PEFT's key
`<path>.token_adapter.trainable_tokens_delta` (the rows themselves, despite the name).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .exact import MergeError, MergesByName
from .mixed import MixedRows, per_adapter_rows

SAVED_SUFFIX = "token_adapter.trainable_tokens_delta"


class TrainableTokens(MergesByName, nn.Module):
    """Trainable rows of an nn.Embedding, or of an output head nn.Linear, per adapter."""

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokens | None = None) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise ValueError(
                f"trainable_token_indices needs an embedding (or an output head) layer, got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self._tied = [tied_to] if tied_to is not None else []  # a list: the owner is not registered twice
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
        self.originals: dict[str, Tensor] = {}  # the table's rows before training: for unmerge
        self.token_indices: dict[str, list[int]] = {}
        self._slot_cache: dict[str, tuple] = {}  # name -> ((ids, device), [vocab] slot map)
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.mixed: MixedRows | None = None

    @property
    def owner(self) -> TrainableTokens:
        """The wrapper that holds the rows: itself, or the embedding a tied head shares them with."""
        return self._tied[0] if self._tied else self

    @property
    def rows(self) -> nn.ParameterDict:
        return self.owner.trainable_tokens_delta

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def adapter_names(self) -> list[str]:
        return list(self.owner.token_indices)

    def add_adapter(self, name: str, indices: Sequence[int]) -> None:
        indices = sorted(set(int(i) for i in indices))
        vocab = self.weight.shape[0]
        bad = [i for i in indices if not 0 <= i < vocab]
        if bad:
            raise ValueError(
                f"trainable_token_indices {bad[:5]} are outside the table of {vocab} tokens; resize the model's "
                "embeddings to the tokenizer first (model.resize_token_embeddings(len(tokenizer)))"
            )
        if self.owner is self:
            rows = self.weight.detach()[indices].clone()
            self.originals[name] = rows.clone()
            self.token_indices[name] = indices
            self.trainable_tokens_delta[name] = nn.Parameter(rows)
        if not self.active_adapters:
            self.active_adapters = [name]

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.set_merged([n for n in self.merged_adapters if n != name])
        if self.owner is self:
            del self.trainable_tokens_delta[name]
            self.token_indices.pop(name)
            self.originals.pop(name)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def own_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.rows[name]] if self.owner is self else []

    # -- merge: the rows written into the table, the table's own rows kept aside ---------------
    @torch.no_grad()
    def set_merged(self, names: Sequence[str], safe: bool = True) -> None:
        names = [n for n in names if n in self.adapter_names]
        if self.owner is not self:  # a tied head shares the table: the embedding merges it
            self.merged_adapters = names
            return
        self._check_disjoint(names)
        for name in reversed(self.merged_adapters):
            self.weight.index_copy_(0, self._index(name), self.originals[name].to(self.weight))
        for name in names:
            rows = self.rows[name].to(self.weight)
            if safe and not torch.isfinite(rows).all():
                raise MergeError(f"the token rows of adapter {name!r} hold NaN or infinite values")
            self.weight.index_copy_(0, self._index(name), rows)
        self.merged_adapters = list(names)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return out
        if self.mixed is not None and not self.mixed.uniform:
            return per_adapter_rows(self, x, out, lambda name, xs, outs: self._with_rows(xs, outs, [name]))
        names = [self.mixed.only] if self.mixed is not None else self.active_adapters
        return self._with_rows(x, out, [n for n in names if n in self.adapter_names])

    def _with_rows(self, x: Tensor, out: Tensor, names: list[str]) -> Tensor:
        merged = self.owner.merged_adapters
        names = [n for n in names if n not in merged]
        self._check_disjoint(names)
        for name in names:
            out = (
                self._lookup(x, out, name) if isinstance(self.base_layer, nn.Embedding) else self._logits(x, out, name)
            )
        return out

    def _lookup(self, ids: Tensor, out: Tensor, name: str) -> Tensor:
        """ids: [...], out: [..., dim]: the adapter's rows where ids are its tokens."""
        where = self._slots(name, ids.device)[ids]  # [...]: row of each token in `rows`, -1 elsewhere
        rows = F.embedding(where.clamp_min(0), self.rows[name].to(out.dtype))
        scale = getattr(self.base_layer, "embed_scale", None)  # Gemma scales its embeddings
        if scale is not None:
            rows = rows * torch.as_tensor(scale, dtype=rows.dtype, device=rows.device)
        return torch.where((where >= 0).unsqueeze(-1), rows, out)

    def _logits(self, x: Tensor, out: Tensor, name: str) -> Tensor:
        """x: [..., dim], out: [..., vocab]: the logits of the adapter's tokens from its rows."""
        bias = self.base_layer.bias
        index = self._index(name).to(out.device)
        logits = F.linear(x, self.rows[name].to(x.dtype), None if bias is None else bias[index])
        return out.index_copy(-1, index, logits.to(out.dtype))

    def token_indices_of(self, name: str) -> list[int]:
        return self.owner.token_indices[name]

    def _index(self, name: str) -> Tensor:
        return torch.tensor(self.token_indices_of(name), dtype=torch.long, device=self.weight.device)

    def _slots(self, name: str, device: torch.device) -> Tensor:
        """[vocab]: each token's row in adapter `name`'s rows, -1 for the others. Built once per
        adapter and device (the ids never change), not in every forward."""
        key = (tuple(self.token_indices_of(name)), device)
        if self._slot_cache.get(name, (None,))[0] != key:
            slot = torch.full((self.weight.shape[0],), -1, dtype=torch.long, device=device)
            slot[self._index(name).to(device)] = torch.arange(len(key[0]), device=device)
            self._slot_cache[name] = (key, slot)
        return self._slot_cache[name][1]

    def _check_disjoint(self, names: Sequence[str]) -> None:
        seen: set[int] = set()
        for name in names:
            overlap = seen & set(self.token_indices_of(name))
            if overlap:
                raise ValueError(
                    f"adapters {list(names)} train the same token rows ({sorted(overlap)[:5]}); activate or merge "
                    "one of them at a time"
                )
            seen |= set(self.token_indices_of(name))

    def extra_repr(self) -> str:
        counts = {n: len(self.token_indices_of(n)) for n in self.adapter_names}
        return f"tokens={counts}, tied={self.owner is not self}, active={self.active_adapters}"


def token_targets(model: nn.Module, spec: list[int] | dict[str, list[int]]) -> dict[str, list[int]]:
    """{module path: token ids} from PEFT's `trainable_token_indices`: a list is the input
    embedding's rows; a dict names the modules ({"embed_tokens": [...], "lm_head": [...]})."""
    paths = {id(m): n for n, m in model.named_modules()}
    if isinstance(spec, dict):
        out = {}
        for key, indices in spec.items():
            found = [n for n in paths.values() if n == key or n.endswith("." + key)]
            if len(found) != 1:
                raise ValueError(f"trainable_token_indices names {key!r}, which matches {len(found)} modules; "
                                 "name one embedding or output head")  # fmt: skip
            out[found[0]] = list(indices)
        return out
    embedding = model.get_input_embeddings()
    while isinstance(embedding, TrainableTokens):
        embedding = embedding.base_layer
    holder = next(
        (n for n, m in model.named_modules() if m is embedding or getattr(m, "base_layer", None) is embedding), None
    )
    if holder is None:
        raise ValueError("trainable_token_indices: this model has no input embedding layer to train rows of")
    return {holder: list(spec)}


def tied_head(model: nn.Module, embedding: nn.Module) -> str | None:
    """The path of the output head that shares `embedding`'s weight, if any."""
    for name, module in model.named_modules():
        base = module.base_layer if isinstance(module, TrainableTokens) else module
        if isinstance(base, nn.Linear) and base.weight is embedding.weight:
            return name
    return None


def new_token_rows(model: nn.Module, ids: Sequence[int]) -> list[int] | dict[str, list[int]]:
    """trainable_token_indices for tokens just added to the vocabulary: the embedding's rows,
    and the output head's as well when it does not share the embedding's weight (its new rows
    start random, so they must train and be saved too)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is embedding.weight:
        return list(ids)
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(embedding)]: list(ids), names[id(head)]: list(ids)}
