"""Small training / generation helpers shared by toy training and evaluation (CPU friendly).

This is not the RSD engine: generation here is plain per-batch ``model.generate`` used to
measure the toy models.
"""
from __future__ import annotations

import math
import random
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .problems import Problem
from .tokenizer import EOS_TOKEN


def policy_prompt(tokenizer, problem_text: str) -> str:
    """Exactly what the engine feeds the policy before the solution."""
    return tokenizer.apply_chat_template([{"role": "user", "content": problem_text}],
                                         add_generation_prompt=True, tokenize=False)


def encode_policy(tokenizer, problems: Sequence[Problem]) -> list[tuple[list[int], int]]:
    """(ids of prompt + reference solution + EOS, number of prompt tokens) per problem."""
    prompts = [policy_prompt(tokenizer, p.text) for p in problems]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    s_ids = tokenizer([p.solution + EOS_TOKEN for p in problems], add_special_tokens=False)["input_ids"]
    return [(a + b, len(a)) for a, b in zip(p_ids, s_ids)]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            ids[i, n - len(s):] = torch.tensor(s)
            mask[i, n - len(s):] = 1
        else:
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
    return ids, mask


def lr_at(step: int, total: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))


def train_loop(model, make_batch: Callable[[int], tuple[torch.Tensor, ...]], loss_fn: Callable, steps: int,
               lr: float, warmup: int = 100, weight_decay: float = 0.0, grad_clip: float = 1.0,
               log: Callable[[str], None] = print, log_every: int = 50,
               callback: Callable[[int], None] | None = None, callback_every: int = 0,
               max_minutes: float | None = None, bf16_autocast: bool = False, lr_min_ratio: float = 0.1) -> dict:
    """Generic AdamW loop with warmup + cosine decay. Returns {"steps", "minutes", "final_loss"}.

    ``bf16_autocast`` runs forward/backward under CPU bf16 autocast (fp32 master weights), which is
    faster on CPUs with AMX / AVX512-BF16.
    """
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in n else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-8)
    model.train()
    t0 = time.time()
    ema = None
    step = 0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup, lr_min_ratio)
        batch = make_batch(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
            loss = loss_fn(model, *batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if log_every and (step + 1) % log_every == 0:
            log(f"  step {step + 1}/{steps} loss {ema:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{(time.time() - t0) / 60:.1f} min")
        if callback and callback_every and (step + 1) % callback_every == 0 and step + 1 < steps:
            model.eval()
            callback(step + 1)
            model.train()
        if max_minutes is not None and (time.time() - t0) / 60 > max_minutes:
            log(f"  time limit reached at step {step + 1}")
            break
    model.eval()
    return {"steps": step + 1, "minutes": (time.time() - t0) / 60, "final_loss": ema}


def lm_loss(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)


class PolicyBatcher:
    """Fresh problems every step (an endless stream), grouped by length to limit padding."""

    def __init__(self, tokenizer, problem_fn: Callable[[int], Problem], batch_size: int, pool_batches: int = 16):
        self.tok = tokenizer
        self.problem_fn = problem_fn
        self.bs = batch_size
        self.pool_batches = pool_batches
        self.next_index = 0
        self.queue: list[list[tuple[list[int], int]]] = []

    def _refill(self):
        n = self.bs * self.pool_batches
        probs = [self.problem_fn(self.next_index + i) for i in range(n)]
        self.next_index += n
        enc = sorted(encode_policy(self.tok, probs), key=lambda x: len(x[0]))
        groups = [enc[i:i + self.bs] for i in range(0, n, self.bs)]
        random.Random(self.next_index).shuffle(groups)
        self.queue = groups

    def __call__(self, step: int):
        if not self.queue:
            self._refill()
        group = self.queue.pop()
        ids, mask = pad_batch([g[0] for g in group], self.tok.pad_token_id)
        labels = ids.clone()
        labels[mask == 0] = -100
        for i, (_, n_prompt) in enumerate(group):
            labels[i, :n_prompt] = -100
        return ids, mask, labels


@torch.no_grad()
def generate_solutions(model, tokenizer, problems: Sequence[Problem], temperature: float = 0.0,
                       seed: int = 0, batch_size: int = 128, max_new_tokens: int = 384,
                       num_samples: int = 1) -> list[list[str]]:
    """Per problem, ``num_samples`` decoded solutions (greedy when temperature == 0)."""
    model.eval()
    prompts = [policy_prompt(tokenizer, p.text) for p in problems]
    enc = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    out: list[list[str]] = [[] for _ in problems]
    eos = tokenizer.eos_token_id
    torch.manual_seed(seed)
    for k in range(num_samples):
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            ids, mask = pad_batch([enc[i] for i in idx], tokenizer.pad_token_id, left=True)
            kwargs = dict(do_sample=False) if temperature <= 0 else dict(do_sample=True, temperature=temperature,
                                                                           top_k=0, top_p=1.0)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, **kwargs)
            for row, i in enumerate(idx):
                toks = gen[row, ids.shape[1]:].tolist()
                if eos in toks:
                    toks = toks[:toks.index(eos)]
                out[i].append(tokenizer.decode(toks, skip_special_tokens=False))
    return out
