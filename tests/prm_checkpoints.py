"""Tiny PRM checkpoints in each published format, built here: backbone tensors plus the head's own,
as their authors ship them. Shared by the HF tests (test_prms.py) and the vLLM ones (test_vllm.py),
which need head sizes vLLM's CPU attention accepts (head_dim 32)."""
from __future__ import annotations

import copy
import json

import torch
from safetensors.torch import save_file

LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}")


def _tokenizer(toy_tokenizer, extra_special=(), template=None):
    tok = copy.deepcopy(toy_tokenizer)
    if extra_special:
        tok.add_special_tokens({"additional_special_tokens": list(extra_special)})
    if template:
        tok.chat_template = template
    return tok


def _qwen2(tok, seed, hidden, heads, kv_heads):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
    return Qwen2ForCausalLM(cfg)


def _save_with_head(model, tok, out, architecture, head: dict):
    out.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("lm_head")}
    save_file({**state, **head}, str(out / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg["architectures"] = [architecture]
    (out / "config.json").write_text(json.dumps(cfg))
    tok.save_pretrained(str(out))
    return str(out)


def build_prm_folders(root, toy_tokenizer, math_shepherd: str, hidden: int = 32, heads: int = 4,
                      kv_heads: int = 2) -> dict[str, str]:
    """format -> folder: Skywork (v_head.summary.*), Qwen2.5-Math-PRM (score.0/score.2), RLHFlow (a
    Llama-3-templated causal LM); `math_shepherd` is a causal-LM folder given by the caller."""
    g = torch.Generator().manual_seed(0)
    folders = {"math_shepherd": math_shepherd}
    tok = _tokenizer(toy_tokenizer)
    folders["skywork"] = _save_with_head(
        _qwen2(tok, 1, hidden, heads, kv_heads), tok, root / "skywork", "Qwen2ForPrmModel",
        {"v_head.summary.weight": torch.randn(1, hidden, generator=g), "v_head.summary.bias": torch.randn(1, generator=g)})
    qtok = _tokenizer(toy_tokenizer, extra_special=["<extra_0>"])
    folders["qwen_prm"] = _save_with_head(
        _qwen2(qtok, 2, hidden, heads, kv_heads), qtok, root / "qwen_prm", "Qwen2ForProcessRewardModel",
        {"score.0.weight": torch.randn(hidden, hidden, generator=g), "score.0.bias": torch.randn(hidden, generator=g),
         "score.2.weight": torch.randn(2, hidden, generator=g), "score.2.bias": torch.randn(2, generator=g)})
    ltok = _tokenizer(toy_tokenizer, template=LLAMA3_TEMPLATE,
                      extra_special=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    ltok.bos_token = "<|begin_of_text|>"
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(3)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(ltok), hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=heads,
                                         max_position_embeddings=1024, pad_token_id=ltok.pad_token_id))
    llama.save_pretrained(str(root / "rlhflow"))
    ltok.save_pretrained(str(root / "rlhflow"))
    folders["rlhflow"] = str(root / "rlhflow")
    return folders


LAYOUTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def relayout(src: str, dst, layout: str) -> str:
    """A copy of a single-file safetensors checkpoint folder in another published layout (sharded ones
    split the tensors over two files and write the index), as the hub serves them."""
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.index.json"))
    state = load_file(str(src / "model.safetensors"))
    names = sorted(state)
    ext = "safetensors" if "safetensors" in layout else "bin"
    stem = "model" if ext == "safetensors" else "pytorch_model"

    def write(tensors: dict, file: str) -> None:
        if ext == "safetensors":
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / file), metadata={"format": "pt"})
        else:
            torch.save(tensors, str(dst / file))

    if layout.endswith(".index.json"):
        halves = [names[: len(names) // 2], names[len(names) // 2:]]
        files = [f"{stem}-0000{i + 1}-of-00002.{ext}" for i in range(2)]
        for part, file in zip(halves, files):
            write({k: state[k] for k in part}, file)
        index = {"metadata": {}, "weight_map": {k: f for part, f in zip(halves, files) for k in part}}
        (dst / layout).write_text(json.dumps(index))
    else:
        write(state, layout)
    return str(dst)
