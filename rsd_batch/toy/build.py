"""Building toy Hugging Face folders: the toy tokenizer and (random-init) tiny Qwen2 models.

Used by the training job and by tests that only need the plumbing (shapes, special tokens,
padding) and not trained weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .problems import ProblemConfig, training_corpus
from .tokenizer import build_tokenizer, save_tokenizer


def build_toy_tokenizer(out_dir: str | Path | None = None, seed: int = 0, n_problems: int = 3000,
                        vocab_size: int = 1024, problem_config: ProblemConfig | None = None):
    """The toy world's tokenizer, trained on a seeded corpus of problems and solutions (~2 s)."""
    return build_tokenizer(out_dir, training_corpus(n_problems, problem_config, seed=seed), vocab_size=vocab_size)


def qwen2_config(tokenizer, num_layers: int = 2, hidden_size: int = 64, intermediate_size: int | None = None,
                 num_heads: int = 4, num_kv_heads: int | None = None, max_position_embeddings: int = 1024,
                 rope_theta: float = 10000.0, tie_word_embeddings: bool = True, **extra):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        **extra,
    )


def new_model(tokenizer, seed: int = 0, **config_kwargs):
    """A random-init ``Qwen2ForCausalLM`` sized by ``config_kwargs`` (see :func:`qwen2_config`)."""
    from transformers import Qwen2ForCausalLM

    cfg = qwen2_config(tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def save_model(model, tokenizer, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """``save_pretrained`` the model (safetensors, optionally cast to ``dtype``) and the tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    _add_legacy_config_keys(out_dir / "config.json", model)
    save_tokenizer(tokenizer, out_dir)
    return out_dir


def _add_legacy_config_keys(path: Path, model) -> None:
    """transformers 5 writes ``rope_parameters``/``dtype``; add the 4.x spellings beside them."""
    import json

    cfg = json.loads(path.read_text())
    rope = cfg.get("rope_parameters") or {}
    cfg.setdefault("rope_theta", rope.get("rope_theta", getattr(model.config, "rope_theta", 10000.0)))
    if "dtype" in cfg:
        cfg.setdefault("torch_dtype", cfg["dtype"])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def build_random_model(out_dir: str | Path, tokenizer=None, num_layers: int = 2, hidden_size: int = 64,
                       intermediate_size: int | None = None, num_heads: int = 4, num_kv_heads: int | None = None,
                       seed: int = 0, **config_kwargs) -> Path:
    """Save a random-init ``Qwen2ForCausalLM`` folder (config, safetensors, tokenizer files) to ``out_dir``.

    ``tokenizer`` defaults to :func:`build_toy_tokenizer` with seed 0.
    """
    if tokenizer is None:
        tokenizer = build_toy_tokenizer()
    model = new_model(tokenizer, seed=seed, num_layers=num_layers, hidden_size=hidden_size,
                      intermediate_size=intermediate_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
                      **config_kwargs)
    return save_model(model, tokenizer, out_dir)


def count_parameters(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
