"""Regenerate the toy world from seeds: tokenizer, held-out problems, draft, target and PRM.

``python jobs/train_toy.py`` (Hydra; every field of :class:`ToyTrainConfig` is overridable, e.g.
``python jobs/train_toy.py draft.steps=6000 stages=[prm,eval]``).

Stages (``stages``): ``data`` (tokenizer + held-out test file), ``draft``, ``target``, ``prm``,
``eval`` (measures all three shipped folders on the held-out file and writes ``train_report.json``
into each). Each stage reads what earlier stages saved, so a stage can be rerun alone.

Training problems come from the generator's ``"train"`` stream (policies) and ``"prm"`` stream
(PRM data); the held-out file from the ``"test"`` stream. Different streams never share a random
generator, and every training problem whose text occurs in the held-out file is skipped, so the
held-out problems are disjoint from training by construction and by check.

The PRM (Math-Shepherd format) is initialised from the trained draft (``prm.init_from``), made deeper
(``prm.num_layers``: extra layers on top, identity-initialised) and given an LM head of its own
(``prm.untie_head``); it stays under 1/10 of the target, so scoring a step is cheap next to it. It is
fine-tuned on (a) on-policy draft rollouts at temperature 0.7, (b) reference solutions with one
synthetically corrupted step, (c) clean references and (d) a fresh stream of references in which any
operation step may slip (``prm.fresh_share`` of every batch), in two phases: first mostly (d) with
column and result slips only, at a constant LR (the arithmetic checks, ``prm.phase1_*``), then the
whole mix with every slip kind. Labels: the checker's *local-correctness* labels at every ``ки`` tag
(2-way loss over the ``+``/``-`` logits, exactly what the adapter reads; "-" mistakes weigh
``prm.neg_weight`` times more) and dense labels on the tokens of each operation step up to its first
wrong token (see :class:`PRMSpec`): the worked columns make every check local.
"""
from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

from .build import build_toy_tokenizer, count_parameters, new_model, save_model
from .checker import check_solution, label_steps
from .lm import PolicyBatcher, generate_solutions, lm_loss, pad_batch, train_loop
from .perturb import SLIPS, multi_perturbed_solution, perturbed_solution
from .problems import ProblemConfig, generate_problems, make_problem, op_step_text, read_problem_set, write_problem_set


@dataclass
class PolicySpec:
    # the draft's shape: head_dim = 64 / 2 = 32, one of the head sizes vLLM's CPU attention accepts
    num_layers: int = 2
    hidden_size: int = 64
    intermediate_size: int = 192
    num_heads: int = 2
    num_kv_heads: int = 2
    steps: int = 2000  # worked steps: ~45% greedy at 1000-1250 steps, ~87% at 1750-2000 (the 80-90% band)
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.0
    seed: int = 0
    continue_steps: int = 0  # optional second phase: reload the saved folder, train this many more steps
    continue_lr: float = 3e-4  # constant LR of the second phase (after continue_warmup steps of warmup)
    continue_warmup: int = 20
    lr_min_ratio: float = 1.0  # cosine decay from lr to lr * lr_min_ratio (1.0 = constant after warmup)
    eval_every: int = 250  # log greedy accuracy on the first eval_problems held-out problems (0 = off)
    eval_problems: int = 200
    bf16_autocast: bool = False  # CPU bf16 autocast for forward/backward (fp32 master weights)
    save_dtype: str = "float32"  # float32 | bfloat16 (size of the committed folder)


@dataclass
class PRMSpec:
    init_from: str = "draft"  # draft | target: which trained policy the PRM starts from (prm: go on training one)
    # Two phases. Phase 1: constant phase1_lr on mostly fresh solutions whose slips are column and
    # result slips only (phase1_slips): on the full mix under a decaying LR the PRM learns how the
    # draft's slips look and never learns to check the columns (arithmetic probe ~0.6 instead of ~0.96).
    # (Sentence slips in phase 1 too: the result check is learned worse, the sentence check no better.)
    phase1_steps: int = 2400
    phase1_lr: float = 1e-3
    phase1_warmup: int = 100
    phase1_fresh_share: float = 0.9
    phase1_slips: Dict[str, float] = field(default_factory=lambda: {"column": 0.6, "result": 0.4})
    # neg_weight of phase 1: with phase 2's 3.5 already there, rejecting whatever is unsure is the easy
    # way out and the column check is never found (probe 0.60 at step 1400 against 0.955 with 2.0)
    phase1_neg_weight: float = 2.0
    # Phase 2 (steps, lr, warmup, lr_min_ratio, fresh_share, fresh_slips): the whole mix at a lower LR
    steps: int = 3600
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 20
    weight_decay: float = 0.0
    n_rollout_problems: int = 6000  # draft rollouts (on-policy samples) for training
    rollout_temperature: float = 0.7
    rollouts_per_problem: int = 1
    n_perturbed: int = 3000  # reference solutions with one corrupted step
    n_clean: int = 1000  # untouched reference solutions
    p_continue: float = 0.5
    seed: int = 0
    bf16_autocast: bool = False
    save_dtype: str = "float32"
    lr_min_ratio: float = 0.3  # cosine decay from lr to lr * lr_min_ratio (1.0: constant)
    eval_every: int = 800  # log AUROC on draft T=0.7 steps of eval_problems validation problems (0 = off)
    eval_problems: int = 200  # drawn from a "prm-val" stream, disjoint from the held-out file
    # Cost-sensitive loss: in RSD a wrongly accepted step derails the solution, a wrongly rejected one
    # only costs a target step, so a "-" mistake weighs neg_weight times a "+" one. 3.5 instead of 2.0
    # moves the reward of 0.7 to where 2.0's ~0.79 was: precision 0.987 -> ~0.99 at recall ~0.9.
    neg_weight: float = 3.5
    # Dense supervision: besides the tag, the tokens of an operation step get "+"/"-" labels up to its
    # first wrong token: "+" while the text is a prefix of the right step (given the previous stated
    # value), "-" on the token where it departs (tokens after it are not labelled: whether they are
    # wrong is not a local question). Weighted dense_weight, a "-" dense_neg_weight times more; it
    # teaches the PRM to check each worked column where it is written, the tag to gather those checks.
    dense_weight: float = 1.0
    dense_neg_weight: float = 3.0
    # Next-token loss on the right tokens of each operation step (those the dense labels mark "+"),
    # through the input embeddings: the PRM keeps learning to write the quotes it has to check (held-out
    # op-step AUROC 0.910 -> 0.936). Weaker in phase 1: at 1.0 the column check is not found (probe 0.78).
    lm_weight: float = 1.0
    phase1_lm_weight: float = 0.3
    # 0: the shape of the policy it starts from; more: extra layers on top, initialised as identities
    num_layers: int = 4
    # this share of every batch: fresh reference solutions (a "prm-fresh" stream) in which each operation
    # step slips with probability fresh_p_err (perturb.multi_perturbed_solution): endless, dense negatives
    fresh_share: float = 0.6
    # the PRM's own LM head: with tied embeddings the "+"/"-" reward rows ARE the embeddings of the
    # "+"/"-" tokens that fill the worked columns, and every such token pushes its own reward
    untie_head: bool = True
    fresh_p_err: float = 0.35
    # shares of the slip kinds in the fresh stream (perturb.SLIPS, more sentence slips: the draft's
    # commonest, and the check learned last): every error class the draft makes
    fresh_slips: Dict[str, float] = field(default_factory=lambda: {**SLIPS, "sentence": 0.3, "column": 0.2})


@dataclass
class EvalSpec:
    n_problems: int = 500  # the held-out file
    prm_temperature: float = 0.7
    # 8: 600-730 wrong operation steps. With 2 (~185, about half of them distinct) the op-step AUROC of an
    # earlier PRM moved by about ±0.01 from sample to sample (0.967 on the held-out file, 0.980 and 0.989
    # on fresh problems).
    prm_samples_per_problem: int = 8
    deltas: List[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.9])
    seed: int = 1234


@dataclass
class ToyTrainConfig:
    out_dir: str = "models/toy"
    data_dir: str = "data/toy"
    test_file: str = "toy_arith_test.jsonl"
    seed: int = 0
    threads: int = 2
    # With two threads or more, the target trains in a process of its own (half the threads) while the
    # draft and then the PRM, which needs only the draft, train in this one: the world in about half
    # the time of one stage after another.
    parallel: bool = True
    stages: List[str] = field(default_factory=lambda: ["data", "draft", "target", "prm", "eval"])
    vocab_size: int = 1024
    problems: ProblemConfig = field(default_factory=ProblemConfig)
    # At a constant 2e-3 the draft's accuracy moves by several points from one eval to the next (48-88% at
    # evals 25 steps apart, over 200 more steps); a few steps at 1e-4 settle it. Chosen on 1,000 "draft-val"
    # problems (neither the held-out file nor the tests' fresh ones): 87.7% greedy / 97.2% of steps right at
    # 2000, 88.7% / 97.5% after 3 more, 89.6% / 97.7% after 6; after 8 the held-out file is past 90% (and
    # after 5 at 1e-3). 3 is in the middle of the 80-90% / >= 97% window.
    draft: PolicySpec = field(default_factory=lambda: PolicySpec(continue_steps=3, continue_lr=1e-4,
                                                                 continue_warmup=1))
    # 3.1M parameters (the draft is 1/23 of it): 800 cosine steps at batch 32 (97.8% held-out) + 200 steps at
    # the final LR (2e-4)
    target: PolicySpec = field(default_factory=lambda: PolicySpec(
        num_layers=4, hidden_size=256, intermediate_size=640, num_heads=8, num_kv_heads=8, steps=800,
        batch_size=32, lr=2e-3, lr_min_ratio=0.1, continue_steps=200, continue_lr=2e-4, eval_every=200,
        eval_problems=100, bf16_autocast=False, save_dtype="bfloat16"))
    prm: PRMSpec = field(default_factory=PRMSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    log_every: int = 100


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_toy", node=ToyTrainConfig)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _problem_cfg(cfg: ToyTrainConfig) -> ProblemConfig:
    p = cfg.problems
    if isinstance(p, ProblemConfig):
        return p
    d = dict(p)
    d["operators"] = list(d["operators"])
    d["op_weights"] = None if d.get("op_weights") is None else list(d["op_weights"])
    return ProblemConfig(**d)


def _test_path(cfg: ToyTrainConfig) -> Path:
    return Path(cfg.data_dir) / cfg.test_file


def _held_out(cfg: ToyTrainConfig):
    return read_problem_set(_test_path(cfg))


def _stream_fn(pcfg: ProblemConfig, seed: int, stream: str, exclude: set[str]):
    def fn(i: int):
        p = make_problem(pcfg, seed, i, stream)
        k = 0
        while p.text in exclude:  # never train on a held-out problem
            k += 1
            p = make_problem(pcfg, seed, i, f"{stream}-redraw{k}")
        return p
    return fn


# --------------------------------------------------------------------------- stages

def stage_data(cfg: ToyTrainConfig):
    pcfg = _problem_cfg(cfg)
    t0 = time.time()
    # the tokenizer corpus uses the generator's default knobs, so the vocabulary does not move with them
    tok = build_toy_tokenizer(Path(cfg.out_dir) / "tokenizer", seed=cfg.seed, vocab_size=cfg.vocab_size)
    test = generate_problems(cfg.eval.n_problems, pcfg, seed=cfg.seed, stream="test")
    write_problem_set(test, _test_path(cfg))
    _log(f"data: tokenizer ({len(tok)} tokens) and {len(test)} held-out problems -> {_test_path(cfg)} "
         f"in {time.time() - t0:.1f}s")
    return tok


def _load_tokenizer(cfg: ToyTrainConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(cfg.out_dir) / "tokenizer"))


def stage_policy(cfg: ToyTrainConfig, role: str) -> dict:
    spec: PolicySpec = getattr(cfg, role)
    pcfg = _problem_cfg(cfg)
    tok = _load_tokenizer(cfg)
    exclude = {p.text for p in _held_out(cfg)}
    model = new_model(tok, seed=spec.seed, num_layers=spec.num_layers, hidden_size=spec.hidden_size,
                      intermediate_size=spec.intermediate_size, num_heads=spec.num_heads,
                      num_kv_heads=spec.num_kv_heads)
    n_params = count_parameters(model)
    _log(f"{role}: {n_params:,} parameters, {spec.steps} steps at batch {spec.batch_size}")
    torch.manual_seed(spec.seed)
    batcher = PolicyBatcher(tok, _stream_fn(pcfg, cfg.seed, "train", exclude), spec.batch_size)
    curve = []

    def monitor(step: int) -> None:
        from .eval import evaluate_policy

        r = evaluate_policy(model, tok, _held_out(cfg)[:spec.eval_problems])
        curve.append({"step": step, "accuracy": r["accuracy"], "step_accuracy": r["step_accuracy"]})
        _log(f"{role} step {step}: held-out accuracy {r['accuracy']:.3f}, step accuracy {r['step_accuracy']:.3f} "
             f"{ {k: round(v, 3) for k, v in r['step_accuracy_by_kind'].items()} }")

    info = train_loop(model, batcher, lm_loss, spec.steps, spec.lr, warmup=spec.warmup,
                      weight_decay=spec.weight_decay, log=_log, log_every=cfg.log_every,
                      bf16_autocast=spec.bf16_autocast, lr_min_ratio=spec.lr_min_ratio,
                      callback=monitor if spec.eval_every else None,
                      callback_every=spec.eval_every)
    if spec.eval_every:
        monitor(info["steps"])  # the end of the first phase
    out = Path(cfg.out_dir) / role
    save_model(model, tok, out, dtype=_dtype(spec.save_dtype))
    report = {"role": role, "parameters": n_params, "config": asdict(spec) if not isinstance(spec, dict) else spec,
              "train_steps": info["steps"], "train_minutes": round(info["minutes"], 2),
              "final_train_loss": info["final_loss"], "train_examples": info["steps"] * spec.batch_size,
              "problem_config": pcfg.to_dict(), "learning_curve": curve}
    _write_report(out, report)
    _log(f"{role}: trained in {info['minutes']:.1f} min, saved to {out}")
    if spec.continue_steps:
        report = stage_policy_continue(cfg, role)
    return report


def stage_policy_continue(cfg: ToyTrainConfig, role: str) -> dict:
    """Second phase: reload the saved folder (as a user would), train ``continue_steps`` more steps at a
    constant ``continue_lr`` on the next problems of the same stream, save over it."""
    spec: PolicySpec = getattr(cfg, role)
    pcfg = _problem_cfg(cfg)
    out = Path(cfg.out_dir) / role
    tok = _load_tokenizer(cfg)
    exclude = {p.text for p in _held_out(cfg)}
    model = _load_causal_lm(out).train()
    report = json.loads((out / "train_report.json").read_text())
    batcher = PolicyBatcher(tok, _stream_fn(pcfg, cfg.seed, "train", exclude), spec.batch_size)
    batcher.next_index = report["train_steps"] * spec.batch_size
    _log(f"{role}: second phase, {spec.continue_steps} steps at lr {spec.continue_lr}")
    info = train_loop(model, batcher, lm_loss, spec.continue_steps, spec.continue_lr, warmup=spec.continue_warmup,
                      weight_decay=spec.weight_decay, log=_log, log_every=cfg.log_every,
                      bf16_autocast=spec.bf16_autocast, lr_min_ratio=1.0)
    save_model(model, tok, out, dtype=_dtype(spec.save_dtype))
    if spec.eval_every:
        from .eval import evaluate_policy

        r = evaluate_policy(model, tok, _held_out(cfg)[:spec.eval_problems])
        report.setdefault("learning_curve", []).append({"step": report["train_steps"] + info["steps"],
                                                        "accuracy": r["accuracy"],
                                                        "step_accuracy": r["step_accuracy"]})
        _log(f"{role} step {report['train_steps'] + info['steps']}: held-out accuracy {r['accuracy']:.3f}")
    report["train_steps"] += info["steps"]
    report["train_minutes"] = round(report["train_minutes"] + info["minutes"], 2)
    report["train_examples"] = report["train_steps"] * spec.batch_size
    report["second_phase"] = {"steps": info["steps"], "lr": spec.continue_lr, "minutes": round(info["minutes"], 2),
                              "final_train_loss": info["final_loss"]}
    _write_report(out, report)
    _log(f"{role}: second phase done in {info['minutes']:.1f} min")
    return report


def _load_causal_lm(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def prm_training_examples(cfg: ToyTrainConfig, tok, draft) -> list[tuple[str, list[str], list[bool]]]:
    """(problem text, steps, local labels): draft rollouts at T=0.7 + perturbed + clean references."""
    spec = cfg.prm
    pcfg = _problem_cfg(cfg)
    exclude = {p.text for p in _held_out(cfg)}
    fn = _stream_fn(pcfg, cfg.seed, "prm", exclude)
    rng = random.Random(spec.seed)
    examples = []
    problems = [fn(i) for i in range(spec.n_rollout_problems)]
    rollouts = generate_solutions(draft, tok, problems, temperature=spec.rollout_temperature, seed=spec.seed,
                                  batch_size=256, num_samples=spec.rollouts_per_problem)
    for p, texts in zip(problems, rollouts):
        for t in texts:
            labels = check_solution(p, t).steps
            if labels:
                examples.append(_with_marks(p, [s.text for s in labels]))
    off = spec.n_rollout_problems
    for i in range(spec.n_perturbed):
        p = fn(off + i)
        steps, _ = perturbed_solution(p, rng, spec.p_continue)
        examples.append(_with_marks(p, steps))
    off += spec.n_perturbed
    for i in range(spec.n_clean):
        p = fn(off + i)
        examples.append(_with_marks(p, p.reference_steps()))
    rng.shuffle(examples)
    return examples


def _common(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _with_marks(problem, steps: list[str]) -> tuple[str, list[str], list[bool], list[int | None]]:
    """(problem text, steps, local labels, marks): ``marks[i]`` is how many leading characters of
    operation step ``i`` agree with the right step given the previous stated value (its whole length
    when the step is right; None where there is no such step to compare with, e.g. first/answer)."""
    labels = label_steps(problem, steps)
    marks: list[int | None] = []
    for i, lab in enumerate(labels):
        text = steps[i].strip()
        mark = None
        if lab.kind == "op":
            if lab.local_correct:
                mark = len(text)
            else:
                prev = labels[i - 1].value if i > 0 else None
                j = i - 1
                if prev is not None and prev >= 0 and j < len(problem.ops):
                    try:
                        right = op_step_text(problem.ops[j], prev)
                    except ValueError:
                        right = None
                    if right is not None and ": " in text and ": " in right:
                        h, m = text.split(": ", 1)
                        rh, rm = right.split(": ", 1)
                        if h != rh:  # another sentence than the operation's: wrong where they part
                            mark = _common(h, rh)
                        else:
                            mark = len(h) + 2 + _common(m, rm)
        marks.append(mark)
    return problem.text, [s.strip() for s in steps], [s.local_correct for s in labels], marks


class PRMBatcher:
    """Batches of (ids, mask, tag labels, dense labels). ``fresh`` (optional) returns ``k`` new
    labelled examples at each call: that share of every batch is drawn fresh, the rest comes from
    ``examples`` (the draft's rollouts and the fixed synthetic set)."""

    def __init__(self, prm_adapter, examples, batch_size: int, seed: int = 0, fresh=None, fresh_share: float = 0.0):
        self.prm = prm_adapter
        self._len: dict[int, int] = {}
        self.enc = [self._encode(e) for e in examples]
        self.fresh = fresh
        self.n_fresh = int(round(batch_size * fresh_share)) if fresh is not None else 0
        self.bs = batch_size - self.n_fresh
        self.rng = random.Random(seed)
        self.queue: list[list[int]] = []

    def with_fresh(self, fresh, fresh_share: float) -> "PRMBatcher":
        """The same fixed examples (encoded once) with another fresh source and share."""
        b = copy.copy(self)
        b.fresh = fresh
        b.n_fresh = int(round((self.bs + self.n_fresh) * fresh_share)) if fresh is not None else 0
        b.bs = self.bs + self.n_fresh - b.n_fresh
        b.queue = []
        return b

    def _tok_len(self, i: int) -> int:
        if i not in self._len:
            self._len[i] = len(self.prm.tokenizer.decode([i]))
        return self._len[i]

    def _encode(self, example):
        text, steps, labels, marks = example
        prm = self.prm
        ids = list(prm.prefix_ids(text))
        pos, dense = [], []
        for i, (step, mark) in enumerate(zip(steps, marks)):
            seg, off = prm.step_ids(text, step, i)
            if mark is not None:
                # the segment is (" " for the first) + step + " ки\n": label each token ending inside the step
                lead = 1 if i == 0 else 0
                at = 0
                for k in range(off):
                    at += self._tok_len(seg[k])
                    if at - lead > len(step):
                        break
                    dense.append((len(ids) + k, at - lead <= mark))
                    if at - lead > mark:
                        break  # the first wrong token is the last one labelled (see PRMSpec.dense_weight)
            pos.append(len(ids) + off)
            ids += seg
        return ids, pos, labels, dense

    def _refill(self):
        order = list(range(len(self.enc)))
        self.rng.shuffle(order)
        # group by length inside chunks of 16 batches
        chunk = self.bs * 16
        groups = []
        for s in range(0, len(order), chunk):
            part = sorted(order[s:s + chunk], key=lambda i: len(self.enc[i][0]))
            groups += [part[k:k + self.bs] for k in range(0, len(part), self.bs)]
        self.rng.shuffle(groups)
        self.queue = groups

    def __call__(self, step: int):
        if not self.queue:
            self._refill()
        rows = [self.enc[i] for i in self.queue.pop()]
        if self.n_fresh:
            rows += [self._encode(e) for e in self.fresh(self.n_fresh)]
        ids, mask = pad_batch([r[0] for r in rows], self.prm.pad_id)
        tag_labels = torch.full(ids.shape, -100, dtype=torch.long)
        dense_labels = torch.full(ids.shape, -100, dtype=torch.long)
        for r, (_, pos, labels, dense) in enumerate(rows):
            for p, ok in dense:
                dense_labels[r, p] = 0 if ok else 1
            for p, l in zip(pos, labels):
                tag_labels[r, p] = 0 if l else 1  # class 0 = "+", class 1 = "-"
        return ids, mask, tag_labels, dense_labels


def stage_prm(cfg: ToyTrainConfig) -> dict:
    from rsd_batch.prms.math_shepherd import MathShepherdPRM

    spec = cfg.prm
    t0 = time.time()
    tok = _load_tokenizer(cfg)
    draft = _load_causal_lm(Path(cfg.out_dir) / "draft")
    model = _load_causal_lm(Path(cfg.out_dir) / spec.init_from)  # PRM starts from a trained policy
    if (spec.num_layers and spec.num_layers > model.config.num_hidden_layers) or (
            spec.untie_head and model.config.tie_word_embeddings):
        model = _prm_shape(model, max(spec.num_layers, model.config.num_hidden_layers), spec.untie_head,
                           seed=spec.seed)
    prm = MathShepherdPRM(model, tok)
    examples = prm_training_examples(cfg, tok, draft)
    n_steps = sum(len(e[2]) for e in examples)
    n_neg = sum(1 for e in examples for l in e[2] if not l)
    data_min = (time.time() - t0) / 60
    _log(f"prm: {len(examples)} training solutions, {n_steps} labelled steps ({n_neg} incorrect), "
         f"built in {data_min:.1f} min")
    fresh_fn = _stream_fn(_problem_cfg(cfg), cfg.seed, "prm-fresh", {p.text for p in _held_out(cfg)})
    fresh_rng = random.Random(spec.seed + 7)
    counter = [0]

    def fresh_source(slips: dict):
        def fresh(k: int):
            out = []
            for _ in range(k):
                p = fresh_fn(counter[0])
                counter[0] += 1
                out.append(_with_marks(p, multi_perturbed_solution(p, fresh_rng, spec.fresh_p_err, dict(slips))))
            return out
        return fresh

    batcher = PRMBatcher(prm, examples, spec.batch_size, seed=spec.seed,
                         fresh=fresh_source(spec.fresh_slips) if spec.fresh_share else None,
                         fresh_share=spec.fresh_share)

    class_weight = torch.tensor([1.0, spec.neg_weight])  # class 0 = "+", class 1 = "-"; phase 1: set below
    dense_weight = torch.tensor([1.0, spec.dense_neg_weight])

    lm_weight = [spec.lm_weight]  # phase 1: set below

    def loss_fn(m, ids, mask, tag_labels, dense_labels):
        hidden = prm.hidden_states(ids, mask)
        logits = prm.logits_from_hidden(hidden).reshape(-1, 2)
        loss = F.cross_entropy(logits, tag_labels.reshape(-1), weight=class_weight, ignore_index=-100)
        if spec.dense_weight and (dense_labels >= 0).any():
            loss = loss + spec.dense_weight * F.cross_entropy(logits, dense_labels.reshape(-1), weight=dense_weight,
                                                              ignore_index=-100)
        if lm_weight[0]:  # go on writing the right steps, through the embeddings (the policy's tied head)
            targets = torch.where(dense_labels[:, 1:] == 0, ids[:, 1:], -100)
            if (targets >= 0).any():
                lm = hidden[:, :-1] @ m.get_input_embeddings().weight.T
                loss = loss + lm_weight[0] * F.cross_entropy(lm.float().reshape(-1, lm.shape[-1]),
                                                               targets.reshape(-1), ignore_index=-100)
        return loss

    curve = []
    monitor = None
    done = [0]  # steps of the earlier phase, so the curve counts from the start
    if spec.eval_every:
        from .eval import arithmetic_probe_auroc, prm_metrics, sample_labelled_steps, score_records

        exclude = {p.text for p in _held_out(cfg)}
        val_fn = _stream_fn(_problem_cfg(cfg), cfg.seed, "prm-val", exclude)
        val = [val_fn(i) for i in range(spec.eval_problems)]
        val_records = sample_labelled_steps(draft, tok, val, temperature=spec.rollout_temperature, seed=spec.seed + 1)

        def monitor(step: int) -> None:
            step += done[0]
            m = prm_metrics(val_records, score_records(prm, val, val_records), deltas=(0.7,))
            op = m["operating_points"][0]
            probe = arithmetic_probe_auroc(prm, val, seed=spec.seed)
            curve.append({"step": step, "auroc": m["auroc"], "auroc_by_kind": m["auroc_by_kind"],
                          "precision@0.7": op["precision"], "recall@0.7": op["recall"], "arithmetic_probe": probe})
            _log(f"prm step {step}: validation AUROC {m['auroc']:.4f} "
                 f"{ {k: round(v, 4) for k, v in m['auroc_by_kind'].items()} } "
                 f"delta 0.7: precision {op['precision']:.3f} recall {op['recall']:.3f}, arithmetic probe {probe:.3f}")

    torch.manual_seed(spec.seed)
    phases = []
    if spec.phase1_steps:
        _log(f"prm: phase 1, {spec.phase1_steps} steps at lr {spec.phase1_lr} on {spec.phase1_slips}")
        class_weight[1] = spec.phase1_neg_weight
        lm_weight[0] = spec.phase1_lm_weight
        info1 = train_loop(model, batcher.with_fresh(fresh_source(spec.phase1_slips), spec.phase1_fresh_share),
                           loss_fn, spec.phase1_steps, spec.phase1_lr, warmup=spec.phase1_warmup,
                           weight_decay=spec.weight_decay, log=_log, log_every=cfg.log_every,
                           bf16_autocast=spec.bf16_autocast, lr_min_ratio=1.0,
                           callback=monitor, callback_every=spec.eval_every)
        phases.append(info1)
        done[0] = info1["steps"]
        if monitor:
            monitor(0)
        class_weight[1] = spec.neg_weight
        lm_weight[0] = spec.lm_weight
        _log(f"prm: phase 2, {spec.steps} steps at lr {spec.lr}")
    info = train_loop(model, batcher, loss_fn, spec.steps, spec.lr, warmup=spec.warmup,
                      weight_decay=spec.weight_decay, log=_log, log_every=cfg.log_every,
                      bf16_autocast=spec.bf16_autocast, lr_min_ratio=spec.lr_min_ratio,
                      callback=monitor, callback_every=spec.eval_every)
    phases.append(info)
    info = {"steps": sum(i["steps"] for i in phases), "minutes": sum(i["minutes"] for i in phases),
            "final_loss": info["final_loss"]}
    out = Path(cfg.out_dir) / "prm"
    save_model(model, tok, out, dtype=_dtype(spec.save_dtype))
    report = {"role": "prm", "format": "math_shepherd", "initialised_from": spec.init_from,
              "parameters": count_parameters(model), "config": asdict(spec) if not isinstance(spec, dict) else spec,
              "train_steps": info["steps"], "train_minutes": round(info["minutes"] + data_min, 2),
              "data_minutes": round(data_min, 2), "final_train_loss": info["final_loss"],
              "train_solutions": len(examples), "train_labelled_steps": n_steps, "train_incorrect_steps": n_neg,
              "learning_curve": curve}
    _write_report(out, report)
    _log(f"prm: trained in {info['minutes']:.1f} min (+{data_min:.1f} min data), saved to {out}")
    return report


def _prm_shape(model, num_layers: int, untie_head: bool, seed: int = 0):
    """The policy reshaped for the PRM: ``num_layers`` layers (its own first, the new ones on top
    initialised as identities: output projections zero) and, with ``untie_head``, an LM head of its own
    (a copy of the embeddings), so the "+"/"-" reward rows move apart from the "+"/"-" tokens the worked
    columns are written with."""
    from transformers import Qwen2ForCausalLM

    cfg = copy.deepcopy(model.config)
    n0 = cfg.num_hidden_layers
    cfg.num_hidden_layers = num_layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[0]] * num_layers
    if untie_head:
        cfg.tie_word_embeddings = False
    torch.manual_seed(seed)
    deep = Qwen2ForCausalLM(cfg)
    state = {k: v for k, v in model.state_dict().items() if not (untie_head and k == "lm_head.weight")}
    missing, unexpected = deep.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    with torch.no_grad():
        if untie_head:
            deep.lm_head.weight.copy_(model.get_input_embeddings().weight)
        for layer in deep.model.layers[n0:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    deep.generation_config = model.generation_config
    return deep.eval()


def stage_eval(cfg: ToyTrainConfig) -> dict:
    from rsd_batch.prms.math_shepherd import MathShepherdPRM

    from .eval import evaluate_policy, evaluate_prm

    t0 = time.time()
    out = Path(cfg.out_dir)
    tok = _load_tokenizer(cfg)
    test = _held_out(cfg)
    results = {}
    models = {}
    for role in ("draft", "target"):
        t1 = time.time()
        models[role] = _load_causal_lm(out / role)
        results[role] = evaluate_policy(models[role], tok, test)
        results[role]["eval_minutes"] = round((time.time() - t1) / 60, 2)
        _log(f"eval {role}: accuracy {results[role]['accuracy']:.3f}, step accuracy "
             f"{results[role]['step_accuracy']:.3f}")
    t1 = time.time()
    prm = MathShepherdPRM.from_pretrained(str(out / "prm"))
    results["prm"] = evaluate_prm(prm, models["draft"], tok, test, temperature=cfg.eval.prm_temperature,
                                  seed=cfg.eval.seed, num_samples=cfg.eval.prm_samples_per_problem,
                                  deltas=tuple(cfg.eval.deltas))
    results["prm"]["eval_minutes"] = round((time.time() - t1) / 60, 2)
    for role in ("draft", "target", "prm"):
        _update_report(out / role, {"eval": results[role], "eval_problems": str(_test_path(cfg))})
    _log(f"eval done in {(time.time() - t0) / 60:.1f} min")
    print(format_table(cfg), flush=True)
    return results


# --------------------------------------------------------------------------- reports

def _write_report(folder: Path, report: dict) -> None:
    (folder / "train_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")


def _update_report(folder: Path, extra: dict) -> None:
    path = folder / "train_report.json"
    rep = json.loads(path.read_text()) if path.exists() else {}
    rep.update(extra)
    rep["folder_mb"] = round(sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 2**20, 2)
    _write_report(folder, rep)


def format_table(cfg: ToyTrainConfig) -> str:
    out = Path(cfg.out_dir)
    reps = {r: json.loads((out / r / "train_report.json").read_text()) for r in ("draft", "target", "prm")}
    lines = ["| model | parameters | train steps | train min | greedy accuracy | step accuracy | folder MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in ("draft", "target"):
        e = reps[r].get("eval", {})
        lines.append(f"| {r} | {reps[r]['parameters']:,} | {reps[r]['train_steps']} | {reps[r]['train_minutes']} | "
                     f"{e.get('accuracy', float('nan')):.3f} | {e.get('step_accuracy', float('nan')):.3f} | "
                     f"{reps[r].get('folder_mb', '')} |")
    p = reps["prm"]
    lines.append(f"| prm | {p['parameters']:,} | {p['train_steps']} | {p['train_minutes']} | - | - | "
                 f"{p.get('folder_mb', '')} |")
    e = p.get("eval")
    if e:
        k = e["auroc_by_kind"]
        lines += ["", f"PRM on draft steps (T={e['temperature']}, {e['num_problems']} problems x {e['num_samples']} "
                      f"samples, {e['n_steps']} steps, {e['share_correct']:.3f} correct):",
                  "| AUROC all | first step | operation steps | answer step | all (prefix labels) | all (correct context) "
                  "| arithmetic probe |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
                  f"| {e['auroc']:.4f} | {k.get('first', float('nan')):.4f} | {k.get('op', float('nan')):.4f} | "
                  f"{k.get('answer', float('nan')):.4f} | {e['auroc_prefix_label']:.4f} | {e['auroc_correct_context']:.4f} "
                  f"| {e.get('auroc_arithmetic_probe', float('nan')):.4f} |",
                  "", "| delta | accepted share | precision | recall |", "| ---: | ---: | ---: | ---: |"]
        for op in e["operating_points"]:
            lines.append(f"| {op['delta']} | {op['accept_share']:.3f} | {op['precision']:.3f} | {op['recall']:.3f} |")
    return "\n".join(lines)


def _stage(cfg: ToyTrainConfig, stage: str) -> float:
    """Run one stage; its minutes."""
    ts = time.time()
    if stage == "data":
        stage_data(cfg)
    elif stage in ("draft", "target"):
        stage_policy(cfg, stage)
    elif stage in ("draft_continue", "target_continue"):
        stage_policy_continue(cfg, stage.split("_")[0])
    elif stage == "prm":
        stage_prm(cfg)
    elif stage == "eval":
        stage_eval(cfg)
    else:
        raise ValueError(f"unknown stage {stage!r}")
    return round((time.time() - ts) / 60, 2)


def _branch(cfg: ToyTrainConfig, stages: list[str], threads: int) -> dict:
    """Stages run one after another in a process of their own (the target's, beside the draft's)."""
    torch.set_num_threads(threads)
    return {stage: _stage(cfg, stage) for stage in stages}


def run(cfg: ToyTrainConfig) -> dict:
    t0 = time.time()
    timings = {}
    stages = list(cfg.stages)
    for stage in stages:
        if stage not in ("data", "draft", "target", "draft_continue", "target_continue", "prm", "eval"):
            raise ValueError(f"unknown stage {stage!r}")
    side = [s for s in stages if s.startswith("target")]
    # what has to wait for the target: the eval, and a PRM that starts from the target
    waits = {"eval"} | ({"prm"} if cfg.prm.init_from == "target" else set())
    if not (cfg.parallel and cfg.threads >= 2 and side and len(side) < len(stages)):
        torch.set_num_threads(cfg.threads)
        for stage in stages:
            timings[stage] = _stage(cfg, stage)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        each = cfg.threads // 2
        torch.set_num_threads(each)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            target = None
            for stage in stages:
                if stage in side:
                    continue
                if target is None and stage != "data":  # the tokenizer and the held-out file exist now
                    target = pool.submit(_branch, cfg, side, each)
                    _log(f"{'+'.join(side)}: in a process of its own, {each} thread(s) each")
                if stage in waits and target is not None and not target.done():
                    _log(f"{stage}: waits for {'+'.join(side)}")
                if stage in waits and target is not None:
                    timings.update(target.result())
                timings[stage] = _stage(cfg, stage)
            if target is None:  # nothing but data beside the target
                target = pool.submit(_branch, cfg, side, each)
            timings.update(target.result())
    timings["total"] = round((time.time() - t0) / 60, 2)
    _log(f"stage minutes: {timings}")
    return timings
