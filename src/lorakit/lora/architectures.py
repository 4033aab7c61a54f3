"""What lorakit knows about model architectures, in one table per fact, for every layer above.

* DEFAULT_TARGETS: per `config.model_type`, the modules the paper adapts (Wq and Wv).
* BLOCK_LISTS: the names of the repeated-block lists (BERT `encoder.layer`, LLaMA `layers`,
  GPT-2 `h`, T5 `block`): `layers_to_transform` counts in them, FT-Top2 trains the last two,
  FSDP shards each block.
* ADAPTER_SITES: where the Houlsby/Lin adapters go in each family's block (the attention
  output projection, the feed-forward output projection), as module-path suffixes.
"""

from __future__ import annotations

import torch.nn as nn

# The paper adapts the attention query and value projections (Wq, Wv). Per architecture
# (`config.model_type`), the names of those modules.
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(
        [
            "bert",
            "roberta",
            "xlm-roberta",
            "electra",
            "albert",
            "camembert",
            "vit",
            "layoutlm",
            "mpnet",
            "ernie",
            "megatron-bert",
        ],
        ["query", "value"],
    ),
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    **dict.fromkeys(
        [
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "olmoe",
            "gpt_oss",
            "phimoe",
            "granitemoe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "opt",
            "bart",
            "mbart",
            "gptj",
            "phi",
            "whisper",
            "marian",
            "pegasus",
            "starcoder2",
            "olmo",
            "olmo2",
            "granite",
            "smollm3",
        ],
        ["q_proj", "v_proj"],
    ),
    **dict.fromkeys(["t5", "mt5", "umt5", "longt5"], ["q", "v"]),
    **dict.fromkeys(["gpt_neox", "bloom", "falcon"], ["query_key_value"]),
    "phi3": ["qkv_proj"],
    "mpt": ["Wqkv"],
    "deberta-v2": ["query_proj", "value_proj"],
    "gpt_bigcode": ["c_attn"],
}

BLOCK_LISTS = ("layers", "layer", "h", "block", "blocks")

ADAPTER_SITES: dict[str, tuple[str, str]] = {
    "BERT/RoBERTa/ELECTRA": ("attention.output.dense", "output.dense"),
    "LLaMA/Mistral/Qwen2/Gemma": ("self_attn.o_proj", "mlp.down_proj"),
    "GPT-2": ("attn.c_proj", "mlp.c_proj"),
    "T5": ("SelfAttention.o", "DenseReluDense.wo"),
    "DistilBERT": ("attention.out_lin", "ffn.lin2"),
    "OPT/BART/Whisper": ("self_attn.out_proj", "fc2"),
    "GPT-NeoX": ("attention.dense", "mlp.dense_4h_to_h"),
}


def block_stacks(model: nn.Module) -> list[nn.ModuleList]:
    """The model's stacks of transformer blocks, outermost only (T5 has two: encoder and
    decoder; the `layer` list inside each T5 block is not a stack). Empty if none is named
    as in BLOCK_LISTS."""
    stacks: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 1
            and name.rsplit(".", 1)[-1] in BLOCK_LISTS
            and not any(name.startswith(outer + ".") for outer, _ in stacks)
        ):
            stacks.append((name, module))
    return [stack for _, stack in stacks]
