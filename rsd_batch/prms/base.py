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

import functools
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import torch

from ..models import WEIGHT_LAYOUTS


class PRMAdapter(ABC):
    pad_id: int
    device: torch.device
    max_batch_tokens: int = 16384

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


def encode_after(tokenizer, context: str, text: str) -> list[int]:
    """The tokens `text` gets when it follows `context` in one encoded string (no special tokens).

    SentencePiece puts a "▁" at the start of every separate `encode` call, so encoding a step on its
    own is not what the model card's whole-string encoding gives it; the tokens that `context + text`
    adds to `context` are. Should the boundary token itself change (a merge across it), the tokens
    after the common prefix are taken.
    """
    both = tokenizer.encode(context + text, add_special_tokens=False)
    head = _encoded(tokenizer, context)
    n = 0
    while n < min(len(both), len(head)) and both[n] == head[n]:
        n += 1
    return both[n:]


@functools.lru_cache(maxsize=4096)
def _encoded(tokenizer, text: str) -> tuple[int, ...]:
    """`text`'s tokens, remembered: a PRM encodes the same contexts (a problem, a tag line) at every step."""
    return tuple(tokenizer.encode(text, add_special_tokens=False))


def without_delimiter(step: str, delimiter: str = "\n\n") -> str:
    """A step as `response.split(delimiter)` gives it to the official scoring code: the trailing
    delimiter gone, every other character (a space before it too) kept."""
    return step[: -len(delimiter)] if step.endswith(delimiter) else step


def _weights_folder(path: str, revision: str | None) -> Path:
    """The local folder holding `path`'s weights; for a hub id, only the files of its layout are fetched."""
    folder = Path(path)
    if folder.is_dir():
        return folder
    from huggingface_hub import HfApi, snapshot_download

    files = set(HfApi().list_repo_files(path, revision=revision))
    layout = next((name for name in WEIGHT_LAYOUTS if name in files), None)
    if layout is None:
        raise ValueError(f"{path}: the hub repository has none of {', '.join(WEIGHT_LAYOUTS)}")
    shards = "*.safetensors" if "safetensors" in layout else "pytorch_model*.bin"
    return Path(snapshot_download(path, revision=revision, allow_patterns=[layout, shards, "*.json"]))


def _tensor_files(folder: Path) -> dict[str, Path] | list[Path]:
    """Tensor name -> file from an index, or the single weights file as a one-item list."""
    for layout in WEIGHT_LAYOUTS:
        if (folder / layout).exists():
            if layout.endswith(".index.json"):
                return {n: folder / f for n, f in json.loads((folder / layout).read_text())["weight_map"].items()}
            return [folder / layout]
    raise ValueError(f"{folder} has no weights: none of {', '.join(WEIGHT_LAYOUTS)} is there. Point the path "
                     "at the folder save_pretrained wrote (or the hub snapshot), with its weight files")


def _read_file(file: Path, names: set[str]) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            return {n: f.get_tensor(n) for n in names & set(f.keys())}
    # .bin: tensors only, never arbitrary pickled objects; mmap keeps a 15 GB shard off the heap.
    state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    return {n: state[n] for n in names & set(state)}


def read_tensors(path: str, names: Sequence[str], revision: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors by their checkpoint names, from a local folder or a hub id, in any published layout:
    model.safetensors, sharded safetensors with model.safetensors.index.json, pytorch_model.bin, or
    sharded .bin with pytorch_model.bin.index.json."""
    folder = _weights_folder(path, revision)
    where = _tensor_files(folder)
    out: dict[str, torch.Tensor] = {}
    if isinstance(where, dict):
        by_file: dict[Path, set[str]] = {}
        for n in names:
            if n in where:
                by_file.setdefault(where[n], set()).add(n)
        for file, wanted in by_file.items():
            out.update(_read_file(file, wanted))
    else:
        out.update(_read_file(where[0], set(names)))
    missing = [n for n in names if n not in out]
    if missing:
        searched = ", ".join(sorted({p.name for p in (where.values() if isinstance(where, dict) else where)}))
        raise ValueError(f"{path}: the checkpoint has no tensor {', '.join(missing)} (looked in {searched}); "
                         "is this the right prm.format for it?")
    return out
