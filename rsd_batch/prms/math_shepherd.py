"""Math-Shepherd format PRM adapter (peiyi9979/math-shepherd-mistral-7b-prm and the toy PRM).

Input, as the model card encodes it: ``tokenizer.encode(problem + " " + "".join(step.strip() + " ки\\n"
for step in steps))`` — one string, with special tokens (BOS for Mistral). The reward of step ``i`` is
read from the causal-LM logits AT the ``i``-th ``ки`` token: ``P("+") / (P("+") + P("-"))``, i.e. the
softmax over the two candidate logits. Scored incrementally, each step gets exactly the tokens the
whole-string encoding gives it (`encode_after`), so incremental scoring equals full scoring.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .base import PRMAdapter, encode_after, read_lm_head_rows

STEP_TAG = "ки"
GOOD_TOKEN = "+"
BAD_TOKEN = "-"


def format_input(problem: str, steps: Sequence[str], step_tag: str = STEP_TAG) -> str:
    """The Math-Shepherd text for ``problem`` followed by ``steps`` (each closed by the step tag)."""
    return problem + " " + "".join(s.strip() + f" {step_tag}\n" for s in steps)


def _last_id(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError(f"{text!r} encodes to no token")
    return ids[-1]


class MathShepherdPRM(PRMAdapter):
    """``score(problems, steps) -> rewards in [0, 1]`` for a Math-Shepherd style causal-LM PRM."""
    auto_class = "AutoModelForCausalLM"  # what `model` is: its cost is the ledger's

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu", step_tag: str = STEP_TAG,
                 good_token: str = GOOD_TOKEN, bad_token: str = BAD_TOKEN, max_batch_tokens: int = 16384,
                 head_rows: torch.Tensor | None = None):
        # model None: another engine runs the backbone; `head_rows` are the ("+", "-") rows of its head.
        self.model = model.eval() if model is not None else None
        self.head_rows = head_rows
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.step_tag = step_tag
        self.step_tag_id = _last_id(tokenizer, step_tag)
        self.good_id = _last_id(tokenizer, good_token)
        self.bad_id = _last_id(tokenizer, bad_token)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_batch_tokens = max_batch_tokens

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        revision: str | None = None, backbone: bool = True, **kwargs) -> "MathShepherdPRM":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), revision=revision)
        if backbone:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, revision=revision).to(device)
            return cls(model, tokenizer, device=device, **kwargs)
        prm = cls(None, tokenizer, device=device, **kwargs)
        prm.head_rows = read_lm_head_rows(str(path), [prm.good_id, prm.bad_id], revision)
        return prm

    # -- the incremental interface the engine uses (rsd_batch/engine/steps.py: score_steps) --------

    def prefix_ids(self, problem: str) -> list[int]:
        return self.tokenizer.encode(problem, add_special_tokens=True)  # BOS, as the card's encode adds

    def step_ids(self, problem: str, step: str, index: int) -> tuple[list[int], int]:
        """Tokens of step `index` (0-based) with its tag, and where the tag is among them: what the
        whole string's encoding gives them after the problem (step 0) or after the previous tag line."""
        text = (" " if index == 0 else "") + step.strip() + f" {self.step_tag}\n"
        ids = encode_after(self.tokenizer, problem if index == 0 else f" {self.step_tag}\n", text)
        return ids, len(ids) - 1 - ids[::-1].index(self.step_tag_id)

    @property
    def backbone(self):
        """The transformer without its LM head: the engine reads hidden states at the tags."""
        return getattr(self.model, self.model.base_model_prefix)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """("+", "-") logits from final hidden states, [..., d] -> [..., 2] (float32)."""
        if self.head_rows is not None:
            w = self.head_rows.to(hidden.device)
            return hidden.float() @ w.float().T
        head = self.model.get_output_embeddings()  # read at call time: the toy trainer updates it
        w = head.weight[[self.good_id, self.bad_id]]
        logits = hidden.to(w.dtype) @ w.T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[[self.good_id, self.bad_id]]
        return logits.float()

    def rewards_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """P("+") / (P("+") + P("-")) from final hidden states at tag positions, [N, d] -> [N]."""
        return self.logits_from_hidden(hidden).softmax(-1)[..., 0]

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[batch, seq, d] final hidden states at every position (right or left padding)."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids).last_hidden_state
