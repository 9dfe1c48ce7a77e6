"""RLHFlow PRMs (Llama3.1-8B-PRM-Mistral/Deepseek-Data): a chat model that answers "+" or "-".

Input: a conversation where each step is a user turn (the first one is problem + " " + step) and the
assistant answers "+" (the earlier answers are taken as "+", as in RLHFlow's own evaluation);
reward = P("+") / (P("+") + P("-")) from the LM logits at the position that predicts the answer.
A step's tokens are what its two turns add to the rendered chat template.
"""
from __future__ import annotations

import torch

from .base import PRMAdapter, read_lm_head_rows


class RLHFlowPRM(PRMAdapter):
    auto_class = "AutoModelForCausalLM"  # what `model` is: its cost is the ledger's
    def __init__(self, model, tokenizer, device, good: str = "+", bad: str = "-",
                 head_rows: torch.Tensor | None = None):
        # model None: another engine runs the backbone; `head_rows` are the ("+", "-") rows of its head.
        self.model = model.eval() if model is not None else None
        self.tokenizer, self.device = tokenizer, torch.device(device)
        self.good_id = tokenizer.encode(good, add_special_tokens=False)[-1]
        self.bad_id = tokenizer.encode(bad, add_special_tokens=False)[-1]
        self.good = good
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if head_rows is None and model is not None:
            head_rows = model.get_output_embeddings().weight[[self.good_id, self.bad_id]]
        self.head_rows = head_rows

    @classmethod
    def from_pretrained(cls, path: str, device="cpu", dtype=torch.float32, revision=None, backbone=True, **kw):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        if backbone:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, revision=revision).to(device)
            return cls(model, tokenizer, device, **kw)
        prm = cls(None, tokenizer, device, **kw)
        prm.head_rows = read_lm_head_rows(path, [prm.good_id, prm.bad_id], revision)
        return prm

    @property
    def backbone(self):
        return getattr(self.model, self.model.base_model_prefix)

    def _render(self, turns: list[str]) -> str:
        messages = []
        for t in turns:
            messages += [{"role": "user", "content": t}, {"role": "assistant", "content": self.good}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False) if messages else ""

    def prefix_ids(self, problem: str) -> list[int]:
        return []  # the problem travels in the first step's user turn

    def step_ids(self, problem: str, step: str, index: int) -> tuple[list[int], int]:
        first = f"{problem} {step.strip()}"
        # What turn `index` adds to the rendered conversation (earlier turns' text does not matter
        # for chat templates that render each message on its own, as Llama 3's does).
        before = self._render([first] + ["x"] * (index - 1)) if index else ""
        after = self._render(([first] + ["x"] * (index - 1) + [step.strip()]) if index else [first])
        ids = self.tokenizer.encode(after[len(before):], add_special_tokens=False)
        answer = len(ids) - 1 - ids[::-1].index(self.good_id)
        return ids, answer - 1  # the position that predicts the answer token

    def rewards_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.head_rows.to(hidden.device)
        return (hidden.to(w.dtype) @ w.T).float().softmax(-1)[:, 0]
