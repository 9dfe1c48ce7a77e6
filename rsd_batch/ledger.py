"""The cost formulas and the per-sample ledger record. This module computes; it never times anything.

Forward FLOPs per token (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1):

    C_forward(token) ≈ 2·N + 2·n_layer·n_ctx·d_attn

N is the number of non-embedding parameters, n_ctx the number of positions the token attends to
(its own included) and d_attn = n_heads·head_dim. Two choices, stated so they can be argued with:
  * N leaves out embedding *lookups* (input token and learned position tables). The output projection
    (lm_head, tied to the input embedding or not) is a real d_model×vocab matmul, but only where logits
    are computed: a prefill computes them for its last token only, a decode for its one token, the
    PRM for none (it reads hidden states), a speculative verification for every proposed position.
    So it is charged per position that computes logits (`logits`), not per token processed.
  * n_ctx is the real context of each token, not the model's maximum: prefilling P tokens after
    `past` cached ones costs Σ_{i=1..P} [2N + 2·L·(past+i)·d_attn]; a decode step is the P=1 case.

Sizes are read from the model *config* (the model is instantiated on the meta device, so no weights
are touched), which makes the formula work for any Hugging Face causal LM or PRM.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import pyarrow as pa

ROLES = ("draft", "target", "prm")


@dataclass(frozen=True)
class CostModel:
    non_embedding_params: int  # the lm_head included
    n_layers: int
    d_attn: int
    head_params: int = 0  # the lm_head's share of non_embedding_params

    def forward_flops(self, n_tokens: int, n_past: int = 0, logits: int | None = None) -> int:
        """FLOPs to run `n_tokens` new tokens through the model on top of `n_past` cached ones,
        computing logits at `logits` of them (None: all of them)."""
        if n_tokens <= 0:
            return 0
        logits = n_tokens if logits is None else logits
        attended = n_tokens * n_past + n_tokens * (n_tokens + 1) // 2  # Σ (past + i)
        body = self.non_embedding_params - self.head_params
        return 2 * body * n_tokens + 2 * self.head_params * logits + 2 * self.n_layers * self.d_attn * attended

    @classmethod
    def from_config(cls, config, auto_class: str = "AutoModelForCausalLM") -> "CostModel":
        """The cost of the model `auto_class` builds from `config` (AutoModel: no lm_head)."""
        import torch
        import transformers

        with torch.device("meta"):
            model = getattr(transformers, auto_class).from_config(config)
        return cls.from_model(model)

    @classmethod
    def from_model(cls, model) -> "CostModel":
        """Count a model's parameters by the rule above (works on a meta-device model too)."""
        from torch import nn

        embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding)
                         for p in m.parameters(recurse=False)}
        params = {id(p): p for p in model.parameters()}  # tied tensors appear once
        n = sum(p.numel() for k, p in params.items() if k not in embedding_ids)
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out is not None and id(out.weight) in embedding_ids:
            n += out.weight.numel()  # tied lm_head: the matmul still happens
        cfg = model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        n_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        return cls(non_embedding_params=int(n), n_layers=int(cfg.num_hidden_layers),
                   d_attn=int(n_heads * head_dim), head_params=int(out.weight.numel()) if out is not None else 0)


@dataclass
class RoleCost:
    """What one model spent on one sample."""

    prefill_tokens: int = 0  # tokens processed in prefill forwards (prompt, and the other model's steps)
    decode_tokens: int = 0  # tokens processed one at a time while generating
    generated_tokens: int = 0  # tokens this model sampled
    discarded_tokens: int = 0  # sampled tokens thrown away (a rejected draft step)
    prefill_flops: int = 0
    decode_flops: int = 0
    seconds: float = 0.0  # this sample's share of the model's wall time (see engine)

    @property
    def flops(self) -> int:
        return self.prefill_flops + self.decode_flops

    def add_prefill(self, cost: CostModel, n_tokens: int, n_past: int, logits: int = 1) -> None:
        """A prefill of `n_tokens` after `n_past` cached, computing logits at `logits` positions (a
        policy: the last one; the PRM: none; a speculative verification: every proposed one)."""
        self.prefill_tokens += n_tokens
        self.prefill_flops += cost.forward_flops(n_tokens, n_past, min(logits, n_tokens))

    def add_decode(self, cost: CostModel, n_past: int) -> None:
        self.decode_tokens += 1
        self.decode_flops += cost.forward_flops(1, n_past, 1)


@dataclass
class Ledger:
    draft: RoleCost = field(default_factory=RoleCost)
    target: RoleCost = field(default_factory=RoleCost)
    prm: RoleCost = field(default_factory=RoleCost)
    latency_seconds: float = 0.0  # from the sample's start to its last token
    target_only_flops: int = 0  # RSD: what the target alone would spend on this prompt and output

    def role(self, name: str) -> RoleCost:
        return getattr(self, name)

    def add(self, other: "Ledger") -> None:
        """Add another ledger's costs (the candidates a search threw away still cost)."""
        for r in ROLES:
            mine, theirs = self.role(r), other.role(r)
            for f in fields(RoleCost):
                setattr(mine, f.name, getattr(mine, f.name) + getattr(theirs, f.name))
        self.target_only_flops += other.target_only_flops

    @property
    def flops(self) -> int:
        return sum(self.role(r).flops for r in ROLES)

    def to_record(self) -> dict:
        out = {r: {**asdict(self.role(r)), "flops": self.role(r).flops} for r in ROLES}
        out["flops"] = self.flops
        out["seconds"] = sum(self.role(r).seconds for r in ROLES)
        out["latency_seconds"] = self.latency_seconds
        out["target_only_flops"] = self.target_only_flops
        return out


_ROLE_TYPE = pa.struct([(f.name, pa.float64() if f.type in ("float", float) else pa.int64())
                        for f in fields(RoleCost)] + [("flops", pa.int64())])
LEDGER_TYPE = pa.struct([(r, _ROLE_TYPE) for r in ROLES]
                        + [("flops", pa.int64()), ("seconds", pa.float64()),
                           ("latency_seconds", pa.float64()), ("target_only_flops", pa.int64())])
