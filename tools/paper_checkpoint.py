"""A random-weight Qwen3-MoE Hugging Face checkpoint with the paper model's decoder shapes.

    python -m tools.paper_checkpoint OUT [--layers 2] [--vocab 8192] [--seed 0]
        [--dtype float32|bfloat16|float16]

Qwen3-VL-30B-A3B's (and Qwen3-30B-A3B's) MoE decoder layer: hidden 2048, 32 query and 4
key/value heads of 128, 128 experts of intermediate 768, top-8 with renormalized weights;
``--layers`` of them (the real model has 48). The vocabulary is ``--vocab`` (default 8192;
the real one is 151,936, whose 311 M-parameter embedding and head would dominate a
2-layer model's decode step) with a byte-level BPE tokenizer trained here on generated
words, so that llama.cpp's converter and ``modec run`` can read it. Weights are
transformers' random initialization from ``--seed``, saved in ``--dtype`` (default float32:
the onnxruntime fp32 baseline then reads them as they are, and every runtime quantizes the
same numbers; bfloat16 is how real checkpoints ship) with ``save_pretrained`` in 2 GB
shards. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

#: The decoder shapes of Qwen3-VL-30B-A3B's language model (its config.json, text_config).
PAPER_DECODER: dict[str, Any] = {
    "hidden_size": 2048,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 768,
    "intermediate_size": 6144,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}


def train_tokenizer(vocab: int, seed: int) -> object:
    """A byte-level BPE ``PreTrainedTokenizerFast`` of at most ``vocab`` tokens, trained on
    sentences of invented words (deterministic from ``seed``)."""
    import numpy as np
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ren", "tas", "vo", "pri", "del", "gun", "sha", "or", "en",
                 "is", "ut", "qua", "zer", "bal", "nim", "ost", "ye"]  # fmt: skip
    words = ["".join(rng.choice(syllables, int(rng.integers(1, 4)))) for _ in range(4000)]
    text = [" ".join(rng.choice(words, 40)) for _ in range(4000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(text, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|im_start|>"
    )


def build(
    out: Path, layers: int, vocab: int = 8192, seed: int = 0, dtype: str = "float32"
) -> Path:  # fmt: skip
    """Write the checkpoint (config, safetensors shards in ``dtype``, tokenizer) into ``out``;
    the same seed gives the same weights in every dtype (rounded from float32)."""
    import torch
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(vocab, seed)
    tok.save_pretrained(out)  # type: ignore[attr-defined]
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=vocab, num_hidden_layers=layers, bos_token_id=tok.bos_token_id,  # type: ignore[attr-defined]
        eos_token_id=tok.eos_token_id, **PAPER_DECODER,  # type: ignore[attr-defined]
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval().to(getattr(torch, dtype))
    model.save_pretrained(out, max_shard_size="2GB")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = ap.parse_args()
    print(build(args.out, args.layers, args.vocab, args.seed, args.dtype))


if __name__ == "__main__":
    main()
