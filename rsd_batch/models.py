"""Loading models with `from_pretrained`: device, dtype, special tokens, prompt rendering.

Decides nothing about what to generate; the engine and the methods do.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from .config import Dtype, ModelConfig, PromptConfig
from .errors import UserError
from .ledger import CostModel

log = logging.getLogger(__name__)


class ModelLoadError(UserError, RuntimeError):
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
    backend: Any = None  # the engine module that runs it: rsd_batch.engine.hf or .vllm
    vocab_size: int = 0  # rows of its input embedding (0: the tokenizer's size)
    # Ids it may sample: the smallest vocabulary of the models that share its sequences (Qwen2.5-Math
    # 1.5B has 151,936 rows, 7B/72B 152,064; an id past the draft's rows would crash it). share_vocab sets it.
    vocab_limit: int = 0
    kv_peak_bytes: int = 0  # engine=hf: the most KV bytes one step of this model held at once

    def __post_init__(self):
        if self.backend is None:
            from .engine import hf
            self.backend = hf
        self.vocab_size = self.vocab_size or len(self.tokenizer)
        self.vocab_limit = self.vocab_limit or self.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def synchronize(self) -> None:
        """Wait for queued GPU work, so wall times are honest."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class LoadedPRM:
    """The PRM as the engine runs it, shaped like `LoadedModel`: its format's adapter (how a step
    becomes tokens and a hidden state a reward: rsd_batch.prms) and what every role carries."""
    adapter: Any
    cost: CostModel
    device: torch.device
    backend: Any = None  # the engine module that scores with it: engine.hf, engine.vllm, or prms.oracle
    engine: Any = None  # engine=vllm: its pooling engine
    role: str = "prm"

    def __post_init__(self):
        if self.backend is None:
            from .engine import hf
            self.backend = hf

    def score(self, problems, steps) -> list[list[float]]:  # noqa: ANN001
        """Every step's reward, from scratch (no cache): calibration, search, tests."""
        return self.adapter.score(problems, steps)


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
    eos, pad = eos_and_pad(cfg.path, tok, model.generation_config)
    max_context = context_of(cfg, model.config)
    cost = CostModel.from_model(model)
    log.info("loaded %s from %s: %.2fM params (%.2fM non-embedding), %s on %s, context %d",
             role, cfg.path, sum(p.numel() for p in model.parameters()) / 1e6,
             cost.non_embedding_params / 1e6, dtype, device, max_context)
    return LoadedModel(role=role, model=model, tokenizer=tok, cost=cost, device=device,
                       max_context=max_context, eos_ids=eos, pad_id=pad,
                       vocab_size=model.get_input_embeddings().num_embeddings)


def share_vocab(models: dict) -> None:
    """Let the draft and the target sample only ids both can embed (they write into one sequence)."""
    policies = [models[r] for r in ("draft", "target") if r in models]
    if policies:
        limit = min(p.vocab_size for p in policies)
        for p in policies:
            p.vocab_limit = limit


# The layouts checkpoints are published in, in the order from_pretrained prefers them: an index that
# maps each tensor to its shard, or one file. Skywork-o1-Open-PRM ships pytorch_model.bin only.
WEIGHT_LAYOUTS = ("model.safetensors.index.json", "model.safetensors",
                  "pytorch_model.bin.index.json", "pytorch_model.bin")


def check_model_files(cfg, roles) -> None:
    """Before anything loads: each role's path is a folder with a config and weights in a published
    layout, or a hub id ("org/name"). A missing file is named, with what to do."""
    from pathlib import Path

    for role in model_roles(cfg, roles):
        node, key = (cfg.prm, "prm.path") if role == "prm" else (cfg.model[role], f"model.{role}.path")
        folder = Path(node.path).expanduser()
        if folder.is_dir():
            if not (folder / "config.json").exists():
                raise ModelLoadError(f"{key}={node.path!r} has no config.json: point it at the folder "
                                     "save_pretrained (or a hub snapshot) wrote")
            if not any((folder / name).exists() for name in WEIGHT_LAYOUTS):
                raise ModelLoadError(f"{key}={node.path!r} has no weights: none of {', '.join(WEIGHT_LAYOUTS)} "
                                     "is there (a download that stopped early?). Copy the weight files "
                                     "into it, or give the hub id")
        elif node.path.startswith(("/", ".", "~")) or node.path.count("/") != 1:
            raise ModelLoadError(f"{key}={node.path!r}: no such folder, and not a hub id (org/name). Give an "
                                 "existing local folder or a hub id")


def model_content(path: str, revision=None) -> dict:
    """What a model *is*, for the run's fingerprint: the sha256 of every file in its folder (weights,
    config, tokenizer; reports and READMEs aside), cached by (path, size, mtime) so a resume re-hashes
    only what changed; for a hub id, the commit its revision resolves to in the local hub cache. The
    same files at another path are the same model; other weights at the same path are not."""
    import os
    from pathlib import Path

    from .files import file_sha256_cached

    folder = Path(path).expanduser()
    if folder.is_dir():
        files = sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.startswith(".")
                       and f.suffix != ".md" and f.name != "train_report.json")
        return {"files": {str(f.relative_to(folder)): file_sha256_cached(f) for f in files}}
    rev = revision or "main"
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface"))
               .expanduser() / "hub")
    ref = hub / f"models--{path.replace('/', '--')}" / "refs" / rev
    return {"hub": path, "revision": ref.read_text().strip() if ref.is_file() else rev}


def model_roles(cfg, roles) -> list[str]:
    """The roles that load a model: all but the toy world's oracle PRM (the checker, no weights)."""
    return [r for r in roles if not (r == "prm" and cfg.prm.format == "oracle")]


def eos_ids(path: str, tok, generation_config) -> frozenset[int]:
    """Every id that ends generation: the tokenizer's EOS and generation_config's (one or a list)."""
    eos = set()
    for source in (tok.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            eos.add(source)
        elif source:
            eos.update(source)
    if not eos:
        raise ModelLoadError(f"{path}: neither the tokenizer nor generation_config names an EOS "
                             "token, so generation could never stop. Fix the model folder.")
    return frozenset(eos)


def eos_and_pad(path: str, tok, generation_config) -> tuple[frozenset[int], int]:
    """The ids that end generation, and the padding id (the tokenizer's, else the smallest EOS)."""
    eos = eos_ids(path, tok, generation_config)
    return eos, tok.pad_token_id if tok.pad_token_id is not None else min(eos)


def check_prompt_lengths(cfg, roles, problems: list[tuple[str, str]]) -> None:
    """Before any model loads (tokenizer and config only): every prompt leaves room in the policies'
    context, else one line naming the problems and what to do (run.long_prompts=refuse, the default)."""
    from transformers import AutoConfig

    from .config import LongPrompts

    policies = [r for r in ("draft", "target") if r in roles]
    if not policies or not problems or cfg.run.long_prompts != LongPrompts.refuse:
        return
    node = cfg.model[policies[0]]
    tok = load_tokenizer(node, f"model.{policies[0]}.path")
    limit = min(context_of(cfg.model[r], AutoConfig.from_pretrained(
        cfg.model[r].path, revision=cfg.model[r].revision, trust_remote_code=cfg.model[r].trust_remote_code))
        for r in policies)
    texts = [render_prompt(tok, p, cfg.prompt) for _, p in problems]
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    long = [(i, n) for (i, _), n in zip(problems, lengths) if n >= limit]
    if long:
        shown = ", ".join(f"{i!r} ({n:,} tokens)" for i, n in long[:5])
        raise PromptTooLong(
            f"{len(long):,} of {len(problems):,} problems have a prompt that does not fit the context of "
            f"{limit:,} tokens (model.<role>.max_context, or the model's own): {shown}"
            f"{' ...' if len(long) > 5 else ''}. Drop them from the problem set, or set "
            "run.long_prompts=error_record to run the rest and record those as errors.")


class PromptTooLong(UserError, ValueError):
    pass


def context_of(cfg: ModelConfig, config) -> int:
    """The context a role may use: model.<role>.max_context, else the model config's own."""
    return cfg.max_context or getattr(config, "max_position_embeddings", None) or 4096


def _load_hint(key: str, path: str, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"{key}={path!r} could not be loaded: {first}. Give a local folder written by "
            "save_pretrained, or a hub id on a machine that can reach the hub "
            "(HF_HUB_OFFLINE=1 uses only the local cache).")


def prompt_messages(problem: str, cfg: PromptConfig) -> list[dict]:
    """The chat turns a problem becomes: the system prompt (if any) and the template as the user turn."""
    return ([{"role": "system", "content": cfg.system}] if cfg.system else []) + \
        [{"role": "user", "content": cfg.template.replace("{problem}", problem)}]


def render_prompt(tokenizer, problem: str, cfg: PromptConfig) -> str:
    """The policy prompt: the chat turns through the chat template when there is one, else plain text."""
    messages = prompt_messages(problem, cfg)
    if cfg.use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages)


# ---------------------------------------------------------------- memory plan

_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


# How many copies of a decoding model's KV the HF engine can hold at once, per sequence in flight: the
# rows' own caches, the batch gathered from them (padded to the longest row) with up to as much spare
# room again as it grows, and the caches extracted from it before the step returns. The engine counts
# what it holds (`LoadedModel.kv_peak_bytes`); tests/test_engine.py checks it stays under this.
HF_KV_COPIES = 4


def physical_devices(cfg, role: str) -> list[str]:
    """The devices a role's weights and KV really sit on: `cuda` is the current GPU (cuda:0 unless set),
    `device_map=auto` spreads over every visible GPU, a vLLM target over its tensor-parallel GPUs."""
    node = cfg.prm if role == "prm" else cfg.model[role]
    gpus = torch.cuda.device_count()
    if getattr(node, "device_map", None):
        return [f"cuda:{i}" for i in range(gpus)] or ["cpu"]
    device = node.device
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device() if gpus else 0}"
    engine = getattr(cfg, "engine", None)
    if engine is not None and str(engine.name) == "vllm" and role == "target" and device.startswith("cuda"):
        tp = engine.tensor_parallel_size or cfg.launcher.gpus_per_task or 1
        if tp > 1:
            return [f"cuda:{i}" for i in range(tp)]
    return [device]


def memory_plan(cfg, roles, batch_size: int) -> list[dict]:
    """Weights and KV-cache budget of each model the method uses, from configs alone (meta device).

    The KV budget assumes every sequence in flight (`batch_size`) reaches the context it may use:
    min(max_context, max_new_tokens + 2048 prompt tokens), times the copies the engine can hold at
    once (HF_KV_COPIES on engine=hf; vLLM holds one), plus one copy for each sample RSD parks for the
    target (up to `method.rewrite_share` of the batch, beside it) — an upper bound, so a fit is a fit.
    """
    from transformers import AutoConfig

    engine = getattr(cfg, "engine", None)
    copies = 1 if engine is not None and str(engine.name) == "vllm" else HF_KV_COPIES
    parked = math.ceil(cfg.method.rewrite_share * batch_size) if str(cfg.method.name) == "rsd" else 0
    plan = []
    for role in model_roles(cfg, roles):
        node = cfg.prm if role == "prm" else cfg.model[role]
        try:
            conf = AutoConfig.from_pretrained(node.path, revision=node.revision,
                                              trust_remote_code=node.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ModelLoadError(_load_hint(f"{'prm' if role == 'prm' else 'model.' + role}.path", node.path, e)) from None
        dtype = torch_dtype(node.dtype, node.device)
        text = getattr(conf, "text_config", None) or conf
        cost = CostModel.from_config(conf) if role != "prm" else None
        params = _count_params(conf)
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * _BYTES.get(dtype, 4)
        limit = getattr(node, "max_context", None) or getattr(text, "max_position_embeddings", 4096)
        context = min(limit, cfg.method.max_new_tokens + 2048)
        devices = physical_devices(cfg, role)
        plan.append({"role": role, "device": ",".join(devices), "devices": devices,
                     "params": params, "weights_bytes": params * _BYTES.get(dtype, 4),
                     "kv_bytes": per_token * context * (batch_size * copies + parked), "kv_bytes_per_token": per_token,
                     "kv_copies": copies, "context": context, "max_context": limit,
                     "dtype": str(dtype).replace("torch.", ""),
                     "flops_per_token": cost.forward_flops(1, 0) if cost else None})
    return plan


def _count_params(conf) -> int:
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(conf)
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) + \
        (conf.vocab_size * conf.hidden_size if not getattr(conf, "tie_word_embeddings", True) else 0)


def free_bytes(device: str) -> int:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free
    import os
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_needs(plan: list[dict]) -> dict[str, int]:
    """Bytes the plan puts on each physical device (a role on several devices: an even share each)."""
    need: dict[str, int] = {}
    for p in plan:
        for device in p["devices"]:
            need[device] = need.get(device, 0) + (p["weights_bytes"] + p["kv_bytes"]) // len(p["devices"])
    return need


def check_memory(plan: list[dict], headroom: float = 0.9) -> str:
    """The plan as a table; raises ModelLoadError, before anything loads, when a device cannot hold it.
    Each physical device is checked once, against everything placed on it (a role spread over several
    devices puts an even share on each)."""
    lines = [f"{'role':<7} {'device':<13} {'dtype':<9} {'params':>10} {'weights':>9} {'KV budget':>10} {'context':>8}"]
    for p in plan:
        lines.append(f"{p['role']:<7} {p['device']:<13} {p['dtype']:<9} {p['params'] / 1e6:>9,.1f}M "
                     f"{p['weights_bytes'] / 2**30:>7.2f}GB {p['kv_bytes'] / 2**30:>8.2f}GB {p['context']:>8}")
    table = "\n".join(lines)
    for device, total in device_needs(plan).items():
        free = free_bytes(device)
        if total > headroom * free:
            raise ModelLoadError(
                f"memory plan: {device} needs {total / 2**30:.1f} GB (weights + KV budget) but has "
                f"{free / 2**30:.1f} GB free.\n{table}\nLower run.batch_size or method.max_new_tokens, use "
                "dtype=bfloat16, or give the target its own GPU(s) with model.target.device_map=auto.")
    return table
