"""Writing small GGUF files the way llama.cpp's converter does, for tests: a tiny random LLaMA
with its projections in chosen block types (Q4_0, Q4_1, Q8_0, ...), q/k rows permuted for
llama.cpp's rotary layout, a vocabulary of plain tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def llama_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the inverse of transformers')."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


# printable ASCII, byte-level BPE's space and newline, one merged pair (llama.cpp wants at least
# one merge), then the end-of-text token
CHARACTERS = [chr(c) for c in range(33, 127)] + ["Ġ", "Ċ", "ab", "<|endoftext|>"]


def write_llama_gguf(model, path: Path, qtype: str = "Q4_0") -> Path:
    """`model` (a transformers LlamaForCausalLM) as a GGUF file: norms and embeddings F32, every
    projection quantised to `qtype` by the gguf package."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"] if hasattr(config, "rope_parameters") else 1e4)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")  # byte-level BPE, one token per character (and "ab")
    writer.add_token_list(CHARACTERS)
    writer.add_token_merges(["a b"])
    writer.add_token_scores([0.0] * len(CHARACTERS))
    writer.add_eos_token_id(len(CHARACTERS) - 1)
    writer.add_bos_token_id(len(CHARACTERS) - 1)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        module, _, suffix = key.rpartition(".")
        name = f"{names.get_name(module)}.{suffix}"
        data = tensor.detach().float().numpy()
        if ".attn_q." in name:
            data = llama_permute(data, config.num_attention_heads)
        elif ".attn_k." in name:
            data = llama_permute(data, config.num_key_value_heads)
        if data.ndim == 2 and "_norm" not in name and name.startswith("blk."):
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_llama_gguf(directory: Path, qtype: str = "Q4_0") -> Path:
    """A 2-block LLaMA, 64 wide (two 32-value blocks a row), written as `directory/tiny.gguf`."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=len(CHARACTERS), max_position_embeddings=64,
                            tie_word_embeddings=False, initializer_range=0.2)  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    return write_llama_gguf(tf.LlamaForCausalLM(config), directory / "tiny.gguf", qtype)
