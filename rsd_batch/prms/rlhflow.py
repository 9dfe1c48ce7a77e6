"""RLHFlow PRMs (Llama3.1-8B-PRM-Mistral/Deepseek-Data): a chat model that answers "+" or "-".

Input: a conversation where each step is a user turn (the first one is problem + " " + step) and the
assistant answers "+" (the earlier answers are taken as "+", as in RLHFlow's own evaluation);
reward = P("+") / (P("+") + P("-")) from the LM logits at the position that predicts the answer.
A step's tokens are what its two turns add to the rendered chat template.
"""
from __future__ import annotations

import torch

from .base import PRMAdapter


class RLHFlowPRM(PRMAdapter):
    def __init__(self, model, tokenizer, device, good: str = "+", bad: str = "-"):
        self.model, self.tokenizer, self.device = model.eval(), tokenizer, torch.device(device)
        self.good_id = tokenizer.encode(good, add_special_tokens=False)[-1]
        self.bad_id = tokenizer.encode(bad, add_special_tokens=False)[-1]
        self.good = good
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def from_pretrained(cls, path: str, device="cpu", dtype=torch.float32, revision=None, **kw):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, revision=revision).to(device)
        return cls(model, tokenizer, device, **kw)

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
        head = self.model.get_output_embeddings()
        w = head.weight[[self.good_id, self.bad_id]]
        return (hidden.to(w.dtype) @ w.T).float().softmax(-1)[:, 0]
