"""Qwen2.5-Math-PRM-7B/72B: a Qwen2 backbone with a 2-way token-classification head.

Input: the chat template with the system prompt, the problem as the user turn, and the steps as the
assistant turn, each followed by `<extra_0>` — as the model card's `"<extra_0>".join(steps)`, the steps
as `response.split("\\n\\n")` gives them (the delimiter gone, other whitespace kept); reward = softmax over the two logits at each `<extra_0>`,
positive class. Native: the backbone loads as Qwen2Model and the head (`score.0`, ReLU, `score.2`)
from the checkpoint's tensors, so `trust_remote_code` is not needed.
"""
from __future__ import annotations

import torch

from .base import PRMAdapter, read_tensors, without_delimiter

HEAD = ("score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias")
SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


class QwenPRM(PRMAdapter):
    auto_class = "AutoModel"  # what `model` is: its cost is the ledger's
    def __init__(self, model, tokenizer, head: dict, device, step_tag: str = "<extra_0>", system: str = SYSTEM):
        # model None: another engine runs the backbone; the head is applied here, in float32.
        self.model = model.eval() if model is not None else None
        self.tokenizer, self.device = tokenizer, torch.device(device)
        dtype = next(model.parameters()).dtype if model is not None else torch.float32
        self.head = {k: v.to(self.device, dtype) for k, v in head.items()}
        self.step_tag, self.system = step_tag, system
        self.step_tag_id = tokenizer.convert_tokens_to_ids(step_tag)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def from_pretrained(cls, path: str, device="cpu", dtype=torch.float32, revision=None, backbone=True, **kw):
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        model = AutoModel.from_pretrained(path, dtype=dtype, revision=revision).to(device) if backbone else None
        return cls(model, tokenizer, read_tensors(path, HEAD, revision), device, **kw)

    @property
    def backbone(self):
        return self.model

    def prefix_ids(self, problem: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [{"role": "system", "content": self.system}, {"role": "user", "content": problem}],
            tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def step_ids(self, problem: str, step: str, index: int) -> tuple[list[int], int]:
        ids = self.tokenizer.encode(without_delimiter(step) + self.step_tag, add_special_tokens=False)
        return ids, len(ids) - 1 - ids[::-1].index(self.step_tag_id)

    def rewards_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.head
        x = torch.relu(hidden.to(h["score.0.weight"].dtype) @ h["score.0.weight"].T + h["score.0.bias"])
        logits = x @ h["score.2.weight"].T + h["score.2.bias"]
        return logits.float().softmax(-1)[:, 1]
