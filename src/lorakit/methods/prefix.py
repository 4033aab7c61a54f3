"""Prefix methods: P trainable positions in front of every sequence.

    prefix-embed   P trainable input embeddings [P, d] are prepended to the token embeddings
                   and the model is called with inputs_embeds [B, P+T, d]. The attention mask
                   ([B, P+T], prefix always attended), token_type_ids (0 for the prefix) grow
                   with it and the prefix takes positions 0..P-1. Token-level outputs (NER,
                   causal-LM logits) are cut back to the T input positions, and their loss is
                   recomputed on those, so the trainer and metrics see the usual shapes.
                   P·d parameters.
    prefix-layer   Every attention layer gets P trainable keys and values [H_kv, P, d_head],
                   handed to the model as a pre-filled key/value Cache (`cache=` or `past_key_values=`, transformers
                   5.x) with the attention mask extended by P ones. BERT-style encoders and
                   LLaMA/GPT-2-style decoders both read a given cache in every self-attention
                   (wrapping the key/value projections would not do: in transformers 5.x the
                   attention reshapes them to the query's length, and LLaMA rotates them).
                   Causal LMs read the input at positions P..P+T-1, after the prefix; other
                   tasks keep the input's own positions 0..T-1 (BERT's absolute positions
                   stay as pretrained). 2·L·P·H_kv·d_head parameters (keys and values, L layers).

Both start from real tokens (Li & Liang's initialisation): prefix-embed from the embeddings of
P random vocabulary tokens, prefix-layer from the keys and values those tokens produce in each
layer (read alone), so a fresh prefix-embed model, and a fresh causal prefix-layer model, is
exactly the base model reading those P tokens first.
A causal prefix-layer model generates: `generate` hands the prefix to the base's own `generate` as
the pre-filled cache it decodes on (prefix-embed does not generate: a clear error).
prefix-embed cannot feed decoder classifiers (they find the last token from input_ids): a clear
error points to prefix-layer.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..models import cache_keyword
from .errors import MethodError

TOKEN_TASKS = ("ner", "causal-lm")  # logits per input token: cut back after prefix-embed


def random_token_ids(model: nn.Module, length: int) -> Tensor:
    """[P] random vocabulary ids (from torch's seeded RNG)."""
    return torch.randint(model.get_input_embeddings().num_embeddings, (length,))


@torch.no_grad()
def layer_activations(model: nn.Module, ids: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """The keys and values, per attention layer ([H_kv, P, d_head] each), that the model
    computes for the token ids [P], read from the cache it fills."""
    from transformers import DynamicCache

    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise MethodError(
            f"prefix-layer supports encoder-only and decoder-only models, not the encoder-decoder "
            f"{type(model).__name__}; use prefix-embed or another --method"
        )
    was_training = model.training
    cache = DynamicCache()
    try:
        model.eval()
        batch = ids[None].to(model.get_input_embeddings().weight.device)  # [1, P]
        model(input_ids=batch, **{cache_keyword(model): cache})
    finally:
        model.train(was_training)
    if not cache.layers or cache.get_seq_length() != len(ids):
        raise MethodError(
            f"prefix-layer needs a model that reads a key/value cache (`cache=`) in its attention; "
            f"this {type(model).__name__} does not; use prefix-embed or another --method"
        )
    return [layer.keys[0].clone() for layer in cache.layers], [layer.values[0].clone() for layer in cache.layers]


def pools_last_token(model: nn.Module) -> bool:
    """Whether a sequence classifier scores the last non-padding token (LLaMA, GPT-2 and other
    decoder classifiers in transformers), rather than a fixed position."""
    try:
        return "last_non_pad_token" in inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return False


def token_loss(logits: Tensor, labels: Tensor, shift: bool) -> Tensor:
    """Mean cross-entropy over the labelled tokens, as the model's own loss computes it
    (causal LMs: position t predicts token t+1). logits [B, T, V], labels [B, T]."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    # Unlabelled tokens carry -100, cross_entropy's default ignore_index (and transformers').
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


class PrefixModel(nn.Module):
    """`model` with a trainable prefix (kind "embed" or "layer", `length` positions), called
    like the model itself on a batch; `task` says whether logits are per token. The base is
    `self.model`; the prefix's parameters are `prefix` (embed) or `keys.i`/`values.i` (layer)."""

    def __init__(self, model: nn.Module, kind: str, length: int, task: str) -> None:
        super().__init__()
        self.model, self.kind, self.length, self.task = model, kind, length, task
        if kind == "embed" and task == "classification" and pools_last_token(model):
            raise MethodError(
                f"prefix-embed cannot classify with {type(model).__name__}: it scores the last "
                "non-padding token, which it finds from input_ids, not inputs_embeds; use prefix-layer"
            )
        self.init_ids = random_token_ids(model, length)  # [P]: the tokens the prefix starts as
        if kind == "embed":
            embedding = model.get_input_embeddings().weight
            self.prefix = nn.Parameter(embedding[self.init_ids.to(embedding.device)].detach().clone())  # [P, d]
        else:
            keys, values = layer_activations(model, self.init_ids)
            self.keys = nn.ParameterList(keys)  # L x [H_kv, P, d_head]
            self.values = nn.ParameterList(values)  # L x [H_kv, P, d_head]

    @property
    def config(self):
        return self.model.config

    def cache(self, batch: int):
        """A fresh Cache holding the prefix keys and values, L x [B, H_kv, P, d_head] (the
        model appends each batch's own keys and values to it)."""
        from transformers import DynamicCache

        return DynamicCache(
            ddp_cache_data=[
                (k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in zip(self.keys, self.values)
            ]
        )

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        **kwargs,
    ):
        B, T = input_ids.shape
        P = self.length
        self._check_positions(T)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        inputs = {"attention_mask": torch.cat([mask.new_ones(B, P), mask], dim=1)}  # [B, P+T]
        if self.kind == "embed":
            embeds = self.model.get_input_embeddings()(input_ids)  # [B, T, d]
            prefix = self.prefix.to(embeds.dtype).expand(B, -1, -1)  # [B, P, d]
            inputs["inputs_embeds"] = torch.cat([prefix, embeds], dim=1)  # [B, P+T, d]
            if token_type_ids is not None:
                inputs["token_type_ids"] = torch.cat([token_type_ids.new_zeros(B, P), token_type_ids], dim=1)
        else:
            inputs.update({"input_ids": input_ids, cache_keyword(self.model): self.cache(B)})
            if self.task != "causal-lm":  # the text keeps its own positions 0..T-1
                inputs["position_ids"] = torch.arange(T, device=input_ids.device)[None]  # [1, T]
            if token_type_ids is not None:
                inputs["token_type_ids"] = token_type_ids
        cut = self.kind == "embed" and self.task in TOKEN_TASKS
        out = self.model(**inputs, labels=None if cut else labels, **kwargs)
        if cut:
            out.logits = out.logits[:, P:]  # [B, T, V]
            if labels is not None:
                out.loss = token_loss(out.logits, labels, shift=self.task == "causal-lm")
        return out

    def _check_positions(self, length: int) -> None:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and self.length + length > limit:
            raise MethodError(
                f"a prefix of {self.length} plus {length} tokens exceeds the model's {limit} positions; "
                "lower --max-length or --prefix-length"
            )

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        """The base model's `generate` reading the prefix first: [B, T] prompt ids (left-padded)
        -> [B, T+N] ids, prompt then continuation, as `generate` returns them for the base.

        The prefix goes in as the pre-filled cache. `generate` expects the cached positions in
        input_ids too and feeds only the rest (from the cache's length on), so P placeholder ids
        (the prefix's initial tokens) stand in for them and are cut off the result; the mask
        [B, P+T] attends the prefix, and positions follow it (0..P-1, then the prompt), as in
        training."""
        if self.kind != "layer" or self.task != "causal-lm":
            raise MethodError(
                f"only causal-LM prefix-layer models generate in lorakit, not prefix-{self.kind} on "
                f"{self.task}; evaluate loss/perplexity instead (--eval-generate 0), or use prefix-layer, "
                "lora, a full/top2/bitfit or an adapter method"
            )
        B, T = input_ids.shape
        P = self.length
        self._check_positions(T + int(kwargs.get("max_new_tokens") or 0))
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        placeholders = self.init_ids.to(input_ids.device).expand(B, -1)  # [B, P]
        out = self.model.generate(
            input_ids=torch.cat([placeholders, input_ids], dim=1),  # [B, P+T]
            attention_mask=torch.cat([mask.new_ones(B, P), mask], dim=1),  # [B, P+T]
            **{cache_keyword(self.model): self.cache(B)},
            **kwargs,
        )
        return out[:, P:]  # [B, T+N]

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        if self.kind == "layer":
            raise MethodError(
                "prefix-layer cannot train with --gradient-checkpointing: checkpointed layers drop "
                "the key/value cache that carries the prefix"
            )
        self.model.gradient_checkpointing_enable(**kwargs)
