"""Skywork-o1-Open-PRM (Qwen2.5-1.5B/7B): a Qwen2 backbone with a scalar value head.

Input, as Skywork's `prepare_input`: bos + problem + "\\n", then each step as `response.split("\\n\\n")`
gives it (the delimiter gone; a space before it, which the official RSD path keeps, kept), encoded on
its own and followed by the step token (the last token of "\\n\\n"); reward = sigmoid(value) at each
step token. The head is read from the checkpoint's own tensors `v_head.summary.weight` / `v_head.summary.bias`, which the
published checkpoints keep beside the backbone (`model.*`); no remote code.
"""
from __future__ import annotations

import torch

from .base import PRMAdapter, read_tensors, without_delimiter

HEAD = ("v_head.summary.weight", "v_head.summary.bias")


class SkyworkPRM(PRMAdapter):
    auto_class = "AutoModel"  # what `model` is: its cost is the ledger's
    def __init__(self, model, tokenizer, head: dict, device, step_token: str = "\n\n"):
        # model None: another engine runs the backbone; the head is applied here, in float32.
        self.model = model.eval() if model is not None else None
        self.tokenizer, self.device = tokenizer, torch.device(device)
        dtype = next(model.parameters()).dtype if model is not None else torch.float32
        self.w = head[HEAD[0]].to(self.device, dtype)  # [1, d]
        self.b = head[HEAD[1]].to(self.device, dtype)  # [1]
        self.step_token_id = tokenizer.encode(step_token, add_special_tokens=False)[-1]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def from_pretrained(cls, path: str, device="cpu", dtype=torch.float32, revision=None, backbone=True, **kw):
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        model = AutoModel.from_pretrained(path, dtype=dtype, revision=revision).to(device) if backbone else None  # Qwen2Model
        return cls(model, tokenizer, read_tensors(path, HEAD, revision), device, **kw)

    @property
    def backbone(self):
        return self.model

    def prefix_ids(self, problem: str) -> list[int]:
        return self.tokenizer.encode((self.tokenizer.bos_token or "") + problem + "\n", add_special_tokens=False)

    def step_ids(self, problem: str, step: str, index: int) -> tuple[list[int], int]:
        ids = self.tokenizer.encode(without_delimiter(step), add_special_tokens=False) + [self.step_token_id]
        return ids, len(ids) - 1

    def rewards_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((hidden.to(self.w.dtype) @ self.w.T + self.b).float())[:, 0]
