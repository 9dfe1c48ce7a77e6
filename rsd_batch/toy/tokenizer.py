"""Byte-level BPE tokenizer for the toy world, built like a (very small) Qwen2 vocabulary.

* Qwen2's pre-tokenizer split regex (digits one by one; punctuation runs absorb trailing newlines,
  so ``".\\n\\n"`` becomes one pre-token and, after training, one token — as in real Qwen vocabularies),
  followed by byte-level mapping; NFC normaliser; byte-level decoder.
* Special tokens ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (EOS), as in Qwen2.5-Instruct.
* The Math-Shepherd step tag ``ки`` is an added (non-special) token; ``+`` and ``-`` are single tokens
  (they are bytes of the base alphabet).
* ChatML chat template (Qwen2 style, without the default system prompt).

The folder carries an explicit ``tokenizer_config.json`` (``tokenizer_class: PreTrainedTokenizerFast``,
special tokens, ``model_input_names``, ``chat_template``) so it loads with ``AutoTokenizer`` in
transformers 4.45+ as well as 5.x.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PAD_TOKEN = "<|endoftext|>"
BOS_CHAT_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_CHAT_TOKEN, EOS_TOKEN]
STEP_TAG = "ки"
GOOD_TOKEN = "+"
BAD_TOKEN = "-"

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _raw_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


def _chat_corpus(corpus: Iterable[str]) -> Iterable[str]:
    for text in corpus:
        yield text
    for _ in range(50):  # enough repetitions for the chat-template words to merge
        for role in ("system", "user", "assistant"):
            yield f"<|im_start|>{role}\n"


def tokenizer_config(tok) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "additional_special_tokens": [BOS_CHAT_TOKEN],
        "model_input_names": ["input_ids", "attention_mask"],
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_prefix_space": False,
        "model_max_length": 2048,
        "chat_template": CHATML_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {"content": c, "lstrip": False, "rstrip": False, "normalized": False,
                     "single_word": False, "special": c in SPECIAL_TOKENS}
            for c, i in ((c, tok.convert_tokens_to_ids(c)) for c in SPECIAL_TOKENS + [STEP_TAG])
        },
    }


def write_tokenizer_config(tok, out_dir: str | Path) -> None:
    """(Re)write tokenizer_config.json / special_tokens_map.json explicitly (see module doc)."""
    out_dir = Path(out_dir)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok), indent=2, ensure_ascii=False) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "additional_special_tokens": [BOS_CHAT_TOKEN],
    }, indent=2) + "\n")
    # transformers 5 may also write chat_template.jinja; keep one source of truth in the config
    jinja = out_dir / "chat_template.jinja"
    if jinja.exists():
        jinja.unlink()


def build_tokenizer(out_dir: str | Path | None, corpus_iter: Iterable[str], vocab_size: int = 1024):
    """Train the toy BPE on ``corpus_iter``, save it to ``out_dir`` (if given) and return it.

    Returns a ``transformers.PreTrainedTokenizerFast`` (EOS ``<|im_end|>``, pad ``<|endoftext|>``).
    """
    from transformers import PreTrainedTokenizerFast

    raw = _raw_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(_chat_corpus(corpus_iter), trainer=trainer)
    raw.add_tokens([AddedToken(STEP_TAG, normalized=False, special=False)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[BOS_CHAT_TOKEN],
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    tok.chat_template = CHATML_TEMPLATE
    if out_dir is not None:
        save_tokenizer(tok, out_dir)
    return tok


def save_tokenizer(tok, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    write_tokenizer_config(tok, out_dir)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
