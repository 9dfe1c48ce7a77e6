"""What every PRM adapter shares: full (non-incremental) scoring built from the same segments the
engine scores incrementally, and reading a head's tensors from the checkpoint itself.

An adapter says how its format writes a problem and its steps as tokens:
    prefix_ids(problem)            tokens before the first step (may be empty)
    step_ids(problem, step, i)     tokens of step i, and the offset of the position whose hidden state
                                   carries that step's reward
    backbone                       the transformer without its head (returns last_hidden_state)
    rewards_from_hidden(h)         [N, d] hidden states -> [N] rewards in [0, 1]
Because a sample's PRM input is always the concatenation of these segments, scoring it in one go
(`score`) and step by step on a KV cache (rsd_batch/engine/steps.py: score_steps) see the same tokens.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import torch


class PRMAdapter(ABC):
    pad_id: int
    device: torch.device
    max_batch_tokens: int = 16384

    @property
    def backend(self):
        """The engine module that runs the backbone: this project's loop unless another is attached
        (rsd_batch/engine/vllm.py: load_prm)."""
        from ..engine import hf
        return self.__dict__.get("_backend", hf)

    @backend.setter
    def backend(self, value) -> None:
        self.__dict__["_backend"] = value

    @abstractmethod
    def prefix_ids(self, problem: str) -> list[int]:
        """Tokens before the first step."""

    @abstractmethod
    def step_ids(self, problem: str, step: str, index: int) -> tuple[list[int], int]:
        """Tokens of step `index` and the offset of its reward position among them."""

    @abstractmethod
    def rewards_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, d] final hidden states at reward positions -> [N] rewards in [0, 1]."""

    @property
    @abstractmethod
    def backbone(self):
        """The transformer without its head."""

    def encode(self, problem: str, steps: Sequence[str]) -> tuple[list[int], list[int]]:
        """The whole input of (problem, steps) and the reward position of every step."""
        ids = list(self.prefix_ids(problem))
        positions = []
        for i, step in enumerate(steps):
            seg, offset = self.step_ids(problem, step, i)
            positions.append(len(ids) + offset)
            ids += seg
        return ids, positions

    @torch.inference_mode()
    def score(self, problems: Sequence[str], steps: Sequence[Sequence[str]],
              padding_side: str = "left") -> list[list[float]]:
        """Reward of every step of every (problem, steps), batched by length under a token budget."""
        from ..engine.steps import length_groups

        enc = [self.encode(p, s) for p, s in zip(problems, steps, strict=True)]
        rewards: list[list[float]] = [[] for _ in enc]
        for group in length_groups([len(ids) for ids, _ in enc], self.max_batch_tokens):
            width = max(len(enc[i][0]) for i in group)
            ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            shift = []
            for r, i in enumerate(group):
                seq = enc[i][0]
                at = width - len(seq) if padding_side == "left" else 0
                ids[r, at:at + len(seq)] = torch.tensor(seq)
                mask[r, at:at + len(seq)] = 1
                shift.append(at)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            hidden = self.backbone(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                   position_ids=pos.to(self.device)).last_hidden_state
            for r, i in enumerate(group):
                at = [shift[r] + p for p in enc[i][1]]
                rewards[i] = self.rewards_from_hidden(hidden[r, at]).float().cpu().tolist() if at else []
        return rewards


def read_lm_head_rows(path: str, rows: Sequence[int], revision: str | None = None) -> torch.Tensor:
    """Rows of a causal LM's output projection from its checkpoint, without loading the model (the
    vLLM engine runs the backbone; a "+"/"-" PRM needs two rows of the head). A tied head is the
    input embedding."""
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        try:
            return read_tensors(path, [name], revision)[name][list(rows)]
        except ValueError:
            continue
    raise ValueError(f"{path}: the checkpoint has neither lm_head.weight nor model.embed_tokens.weight; "
                     "is this the right prm.format for it?")


def read_tensors(path: str, names: Sequence[str], revision: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors by their checkpoint names, from a local folder or a hub id (single or sharded safetensors)."""
    from safetensors import safe_open

    folder = Path(path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download
        folder = Path(snapshot_download(path, revision=revision, allow_patterns=["*.safetensors", "*.json"]))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        where = json.loads(index.read_text())["weight_map"]
        files = {n: folder / where[n] for n in names if n in where}
    else:
        files = {n: folder / "model.safetensors" for n in names}
    out = {}
    for name, file in files.items():
        with safe_open(str(file), framework="pt") as f:
            if name in f.keys():
                out[name] = f.get_tensor(name)
    missing = [n for n in names if n not in out]
    if missing:
        raise ValueError(f"{path}: the checkpoint has no tensor {', '.join(missing)}; is this the right "
                         "prm.format for it?")
    return out
