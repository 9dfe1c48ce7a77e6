"""Loading models with `from_pretrained`: device, dtype, special tokens, prompt rendering.

Decides nothing about what to generate; the engine and the methods do.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .config import Dtype, ModelConfig, PromptConfig
from .ledger import CostModel

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    role: str
    model: torch.nn.Module
    tokenizer: object
    cost: CostModel
    device: torch.device
    max_context: int
    eos_ids: frozenset[int]
    pad_id: int

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def synchronize(self) -> None:
        """Wait for queued GPU work, so wall times are honest."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def torch_dtype(dtype: Dtype, device: str) -> torch.dtype:
    if dtype == Dtype.auto:
        return torch.float32 if device == "cpu" else torch.bfloat16
    return getattr(torch, dtype.value)


def load_tokenizer(cfg: ModelConfig, key: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.path, revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(_load_hint(key, cfg.path, e)) from None
    tok.padding_side = "left"
    return tok


def load_causal_lm(cfg: ModelConfig, role: str, key: str | None = None) -> LoadedModel:
    """Load `cfg` as the model playing `role`; `key` names the config entry in errors."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar per job is ours; no per-file bars
    key = key or f"model.{role}.path"
    tok = load_tokenizer(cfg, key)
    dtype = torch_dtype(cfg.dtype, cfg.device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.path, revision=cfg.revision, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
            **({"device_map": cfg.device_map} if cfg.device_map else {}))
    except (OSError, ValueError) as e:
        raise ModelLoadError(_load_hint(key, cfg.path, e)) from None
    if cfg.device_map:  # placed by accelerate: inputs go where the embeddings are
        device = model.get_input_embeddings().weight.device
    else:
        device = torch.device(cfg.device)
        model.to(device)
    model.eval()
    eos = set()
    for source in (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            eos.add(source)
        elif source:
            eos.update(source)
    if not eos:
        raise ModelLoadError(f"{cfg.path}: neither the tokenizer nor generation_config names an EOS "
                             "token, so generation could never stop. Fix the model folder.")
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
    max_context = cfg.max_context or getattr(model.config, "max_position_embeddings", None) or 4096
    cost = CostModel.from_model(model)
    log.info("loaded %s from %s: %.2fM params (%.2fM non-embedding), %s on %s, context %d",
             role, cfg.path, sum(p.numel() for p in model.parameters()) / 1e6,
             cost.non_embedding_params / 1e6, dtype, device, max_context)
    return LoadedModel(role=role, model=model, tokenizer=tok, cost=cost, device=device,
                       max_context=max_context, eos_ids=frozenset(eos), pad_id=pad)


def _load_hint(key: str, path: str, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"{key}={path!r} could not be loaded: {first}. Give a local folder written by "
            "save_pretrained, or a hub id on a machine that can reach the hub "
            "(HF_HUB_OFFLINE=1 uses only the local cache).")


def render_prompt(tokenizer, problem: str, cfg: PromptConfig) -> str:
    """The policy prompt: the template as the user turn, through the chat template when there is one."""
    user = cfg.template.replace("{problem}", problem)
    if cfg.use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + \
            [{"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (cfg.system + "\n\n" + user) if cfg.system else user
