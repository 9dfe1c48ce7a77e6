"""The embedded toy world: generator, checker, tokenizer, and the committed models' bars.

The model tests load the shipped folders under models/toy with ``from_pretrained`` and measure them
on fresh problems (a regression test of the committed artefacts, not of training).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rsd_batch.toy.checker import check_solution, label_steps, split_steps
from rsd_batch.toy.problems import (
    Problem,
    ProblemConfig,
    generate_problems,
    make_problem,
    read_problem_set,
    write_problem_set,
)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models" / "toy"
TEST_FILE = ROOT / "data" / "toy" / "toy_arith_test.jsonl"


def _shipped_problem_config() -> ProblemConfig:
    rep = json.loads((MODELS / "draft" / "train_report.json").read_text())
    return ProblemConfig(**rep["problem_config"])


# --------------------------------------------------------------------------- generator

def test_generator_is_deterministic_and_streams_differ():
    cfg = ProblemConfig()
    a = [p.to_record() for p in generate_problems(50, cfg, seed=3)]
    b = [p.to_record() for p in generate_problems(50, cfg, seed=3)]
    assert a == b
    c = [p.to_record() for p in generate_problems(50, cfg, seed=4)]
    d = [p.to_record() for p in generate_problems(50, cfg, seed=3, stream="test")]
    assert sum(x["problem"] == y["problem"] for x, y in zip(a, c)) == 0
    assert sum(x["problem"] == y["problem"] for x, y in zip(a, d)) == 0
    # problem i does not depend on how many came before it
    assert make_problem(cfg, 3, 17).to_record() == a[17]


def test_generator_knobs():
    cfg = ProblemConfig(min_ops=2, max_ops=3, start_min=5, start_max=9, add_min=1, add_max=4,
                        operators=["add", "mul"], mul_min=2, mul_max=3, max_value=500)
    probs = generate_problems(300, cfg, seed=0)
    assert {len(p.ops) for p in probs} <= {2, 3}
    assert {op.kind for p in probs for op in p.ops} == {"add", "mul"}
    for p in probs:
        assert 5 <= p.start <= 9
        assert all(0 < v <= 500 for v in p.values)
        for op in p.ops:
            assert (1 <= op.operand <= 4) if op.kind == "add" else (2 <= op.operand <= 3)
    div = generate_problems(200, ProblemConfig(operators=["div", "add"], start_min=100, start_max=999), seed=1)
    assert any(op.kind == "div" for p in div for op in p.ops)
    for p in div:
        p.values  # exact divisions only (apply_op raises otherwise)


def test_problem_text_and_reference_solution():
    p = Problem.from_record(generate_problems(1, seed=11)[0].to_record())
    assert p.text.startswith(f"{p.name} has {p.start} {p.item}.")
    assert p.text.endswith(f"How many {p.item} does {p.name} have now?")
    steps = p.solution.split("\n\n")
    assert len(steps) == len(p.ops) + 2
    assert steps[-1] == f"The answer is \\boxed{{{p.answer}}}."
    chk = check_solution(p, p.solution)
    assert chk.final_correct and chk.complete
    assert all(s.local_correct and s.prefix_correct for s in chk.steps)


def test_write_and_read_jsonl_and_arrow(tmp_path):
    probs = generate_problems(20, seed=5)
    paths = write_problem_set(probs, tmp_path / "set")
    assert sorted(p.suffix for p in paths) == [".arrow", ".jsonl"]
    import pyarrow as pa

    with pa.memory_map(str(tmp_path / "set.arrow")) as src:
        table = pa.ipc.open_file(src).read_all()
    for col in ("id", "problem", "answer", "solution"):
        assert table.schema.field(col).type == pa.string()
    for path in paths:
        back = read_problem_set(path)
        assert [b.to_record() for b in back] == [p.to_record() for p in probs]


def test_shipped_test_file_is_held_out():
    held = read_problem_set(TEST_FILE)
    assert len(held) == 500
    assert len({p.id for p in held}) == 500
    cfg = _shipped_problem_config()
    assert held[0].to_record() == make_problem(cfg, 0, 0, "test").to_record()
    texts = {p.text for p in held}
    train = generate_problems(20000, cfg, seed=0, stream="train")
    prm = generate_problems(5000, cfg, seed=0, stream="prm")
    assert not texts & {p.text for p in train + prm}
    for p in held[:50]:
        assert check_solution(p, p.solution).final_correct


# --------------------------------------------------------------------------- checker

def _fixed_problem() -> Problem:
    from rsd_batch.toy.problems import Op

    return Problem(id="t", name="Ann", pronoun="She", item="coins", start=23, ops=[
        Op("add", 5, "She buys 5 more."), Op("mul", 2, "She doubles them."), Op("sub", 7, "She gives away 7."),
    ])


def test_checker_right_solution():
    p = _fixed_problem()
    text = ("Ann starts with 23 coins.\n\nShe buys 5 more: 23 + 5 (3+5+0=8,2+0+0=2) = 28.\n\n"
            "She doubles them: 28 * 2 (8*2+0=16,2*2+1=5) = 56.\n\n"
            "She gives away 7: 56 - 7 (16-7-0=9,5-0-1=4) = 49.\n\nThe answer is \\boxed{49}.")
    assert text == p.solution
    chk = check_solution(p, text)
    assert [s.kind for s in chk.steps] == ["first", "op", "op", "op", "answer"]
    assert all(s.local_correct for s in chk.steps) and all(s.prefix_correct for s in chk.steps)
    assert chk.final_answer == 49 and chk.final_correct
    assert check_solution(p, text + "<|im_end|>").final_correct  # EOS marker is ignored


def test_arithmetic_probe_pairs_and_oracle():
    """The probe's pairs differ only in one operation step's result, which the checker marks wrong;
    a scorer that checks the arithmetic (the checker itself) gets AUROC 1, a constant one 0.5."""
    import random

    from rsd_batch.toy.eval import arithmetic_probe_auroc
    from rsd_batch.toy.perturb import wrong_result_probe

    problems = generate_problems(50, ProblemConfig(), seed=7, stream="probe")
    rng = random.Random(0)
    for p in problems:
        right, wrong = wrong_result_probe(p, rng)
        assert right[:-1] == wrong[:-1] and right[-1] != wrong[-1]
        assert right[-1].split(" (")[0] == wrong[-1].split(" (")[0]  # same "a op b", other result
        assert right[-1].split(" = ")[-1] != wrong[-1].split(" = ")[-1]
        assert all(s.local_correct for s in label_steps(p, right))
        labels = label_steps(p, wrong)
        assert all(s.local_correct for s in labels[:-1]) and not labels[-1].local_correct

    by_text = {p.text: p for p in problems}

    class Checker:  # the checker's labels as rewards: what a PRM that verifies would output
        def score(self, texts, steps):
            return [[float(s.local_correct) for s in label_steps(by_text[t], st)] for t, st in zip(texts, steps)]

    class Constant:
        def score(self, texts, steps):
            return [[0.5] * len(st) for st in steps]

    assert arithmetic_probe_auroc(Checker(), problems) == 1.0
    assert arithmetic_probe_auroc(Constant(), problems) == 0.5


def test_checker_wrong_step_local_vs_prefix():
    p = _fixed_problem()
    text = ("Ann starts with 23 coins.\n\nShe buys 5 more: 23 + 5 (3+5+0=9,2+0+0=2) = 29.\n\n"
            "She doubles them: 29 * 2 (9*2+0=18,2*2+1=5) = 58.\n\n"
            "She gives away 7: 58 - 7 (8-7-0=1,5-0-0=5) = 51.\n\nThe answer is \\boxed{51}.")
    chk = check_solution(p, text)
    assert [s.local_correct for s in chk.steps] == [True, False, True, True, True]
    assert [s.prefix_correct for s in chk.steps] == [True, False, False, False, False]
    assert chk.final_answer == 51 and not chk.final_correct


@pytest.mark.parametrize("steps,local", [
    (["Ann starts with 32 coins."], [False]),                                   # wrong start
    (["Ann starts with 23 coins.", "She buys 5 more: 23 - 5 (13-5-0=8,2-0-1=1) = 18."], [True, False]),  # operator
    (["Ann starts with 23 coins.", "She buys 6 more: 23 + 6 (3+6+0=9,2+0+0=2) = 29."], [True, False]),  # operand
    (["Ann starts with 23 coins.", "She buys 5 more: 22 + 5 (2+5+0=7,2+0+0=2) = 27."], [True, False]),  # carried
    (["Ann starts with 23 coins.", "She buys 5 more: 23 + 5 = 28."], [True, False]),  # no worked columns
    (["Ann starts with 23 coins.", "She buys 5 more: 23 + 5 (3+5+0=8,2+0+0=2) = 29."], [True, False]),  # result
    (["Ann starts with 23 coins.", "She buys 5 more: 23 + 5 (3+5+0=9,2+0+0=2) = 28."], [True, False]),  # column
    (["Ann starts with 23 coins.", "She buys 5 more: 23 + 5 (3+5+0=8,2+0+0=2) = 28.", "The answer is \\boxed{28}."],
     [True, True, False]),                                                      # answered too early
    (["Ann starts with 23 coins.", "She buys 5 more: 23 + 5 (3+5+0=8,2+0+0=2) = 28.",
      "She doubles them: 28 * 2 (8*2+0=16,2*2+1=5) = 56.", "She gives away 7: 56 - 7 (16-7-0=9,5-0-1=4) = 49.",
      "The answer is \\boxed{48}.", "Extra."],
     [True, True, True, True, False, False]),                                   # wrong box, text after answer
    (["Ann starts with 23 coins.", "She buys 5 more and then some."], [True, False]),  # unparseable step
])
def test_checker_labels(steps, local):
    assert [s.local_correct for s in label_steps(_fixed_problem(), steps)] == local


def test_split_steps():
    assert split_steps("a.\n\n b.\n\n\n\nc.<|im_end|>junk") == ["a.", "b.", "c."]


# --------------------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MODELS / "draft"))


def test_tokenizer_special_tokens(tok):
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id != tok.pad_token_id
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "ки", "+", "-"):
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t
    assert tok.encode("", add_special_tokens=True) == []  # no BOS, like Qwen2
    cfg = json.loads((MODELS / "draft" / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["model_input_names"] == ["input_ids", "attention_mask"]
    from transformers import AutoConfig

    for role in ("draft", "target", "prm"):
        assert AutoConfig.from_pretrained(str(MODELS / role)).eos_token_id == tok.eos_token_id


def test_tokenizer_step_delimiter_and_digits(tok):
    ids = tok.encode("= 28.\n\nShe", add_special_tokens=False)
    toks = tok.convert_ids_to_tokens(ids)
    assert ".ĊĊ" in toks  # ".\n\n" merged into one token, as in Qwen vocabularies
    assert "2" in toks and "8" in toks  # digits one by one
    text = "Ann has 23 coins.\n\nShe buys 5 more: 23 + 5 = 28.\n\nThe answer is \\boxed{28}.<|im_end|>"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_chat_template(tok):
    s = tok.apply_chat_template([{"role": "user", "content": "Hi?"}], add_generation_prompt=True, tokenize=False)
    assert s == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    s2 = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                                 add_generation_prompt=False, tokenize=False)
    assert s2 == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"


def test_build_tokenizer_and_random_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rsd_batch.toy.build import build_random_model, build_toy_tokenizer

    t = build_toy_tokenizer(tmp_path / "tok", n_problems=300)
    path = build_random_model(tmp_path / "m", t, num_layers=1, hidden_size=32)
    model = AutoModelForCausalLM.from_pretrained(str(path))
    t2 = AutoTokenizer.from_pretrained(str(path))
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.vocab_size == len(t2) and t2.eos_token_id == model.config.eos_token_id
    assert model(torch.tensor([t2.encode("Ann has 3 coins.")])).logits.shape[-1] == len(t2)


def test_world_trained_with_the_target_beside_is_the_world_trained_in_turn(tmp_path):
    """`parallel=true` trains the target in a process of its own while the draft and the PRM train in
    this one (one thread each); the folders are the same, byte for byte, as one stage after another."""
    from safetensors.torch import load_file

    from rsd_batch.toy.train import PolicySpec, PRMSpec, ToyTrainConfig, run

    def world(folder, parallel, threads):
        tiny = dict(steps=4, eval_every=0, batch_size=4)
        cfg = ToyTrainConfig(out_dir=str(folder / "toy"), data_dir=str(folder / "data"), threads=threads,
                             parallel=parallel, stages=["data", "draft", "target", "prm"],
                             draft=PolicySpec(**tiny, continue_steps=2, continue_lr=1e-4, continue_warmup=1),
                             target=PolicySpec(num_layers=1, hidden_size=64, **tiny),
                             prm=PRMSpec(phase1_steps=2, steps=2, batch_size=10, n_rollout_problems=8,
                                         n_perturbed=8, n_clean=4, eval_every=0))
        cfg.eval.n_problems = 10
        timings = run(cfg)
        assert {"data", "draft", "target", "prm", "total"} <= set(timings)
        return {role: load_file(str(folder / "toy" / role / "model.safetensors")) for role in ("draft", "target", "prm")}

    apart, in_turn = world(tmp_path / "a", True, 2), world(tmp_path / "b", False, 1)
    for role in apart:
        assert apart[role].keys() == in_turn[role].keys()
        assert all(torch.equal(apart[role][k], in_turn[role][k]) for k in apart[role]), role


# --------------------------------------------------------------------------- shipped models

@pytest.fixture(scope="module")
def fresh():
    return generate_problems(200, _shipped_problem_config(), seed=20250, stream="fresh")


@pytest.fixture(scope="module")
def draft():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(MODELS / "draft")).eval()


def test_model_folders_small_and_standard():
    total = 0
    for role in ("draft", "target", "prm"):
        folder = MODELS / role
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["architectures"] == ["Qwen2ForCausalLM"]
        # vLLM's Qwen2 uses hidden_size / num_attention_heads as head_dim; its CPU attention takes 32, 64, 80, ...
        assert cfg["hidden_size"] / cfg["num_attention_heads"] in {32, 64}, (role, cfg["hidden_size"])
        assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
        assert (folder / "train_report.json").exists()
        total += sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    assert total <= 20 * 2**20
    # issue 14: the draft costs <= 1/20 of the target per token, the PRM <= 1/10 (parameters as the proxy)
    params = {r: json.loads((MODELS / r / "train_report.json").read_text())["parameters"]
              for r in ("draft", "target", "prm")}
    assert params["draft"] * 20 <= params["target"], params
    assert params["prm"] * 10 <= params["target"], params


def test_draft_in_band(tok, draft, fresh):
    from rsd_batch.toy.build import count_parameters
    from rsd_batch.toy.eval import evaluate_policy

    assert 90_000 <= count_parameters(draft) <= 300_000
    r = evaluate_policy(draft, tok, fresh)
    assert 0.80 <= r["accuracy"] <= 0.90, r  # issue 14: a draft as strong next to its target as the paper's
    assert r["step_accuracy"] >= 0.97, r


def test_target_accurate(tok, fresh):
    from transformers import AutoModelForCausalLM

    from rsd_batch.toy.build import count_parameters
    from rsd_batch.toy.eval import evaluate_policy

    target = AutoModelForCausalLM.from_pretrained(str(MODELS / "target")).eval()
    assert 3_000_000 <= count_parameters(target) <= 5_000_000
    r = evaluate_policy(target, tok, fresh)
    assert r["accuracy"] >= 0.98, r


@pytest.fixture(scope="module")
def prm_metrics_fresh(tok, draft, fresh):
    from rsd_batch.prms.math_shepherd import MathShepherdPRM
    from rsd_batch.toy.eval import prm_metrics, sample_labelled_steps, score_records

    prm = MathShepherdPRM.from_pretrained(str(MODELS / "prm"))
    records = sample_labelled_steps(draft, tok, fresh, temperature=0.7, seed=99)
    rewards = score_records(prm, fresh, records)
    assert all(0.0 <= r <= 1.0 for r in rewards)
    return prm_metrics(records, rewards, deltas=(0.7, 0.9))


def test_prm_separates_draft_steps(prm_metrics_fresh):
    """Regression floor of the shipped PRM on the draft's own T=0.7 steps (issue 14's bar: the test below)."""
    m = prm_metrics_fresh
    assert m["n_by_kind"]["op"]["incorrect"] >= 15  # the sample has real negatives
    assert m["auroc"] >= 0.75, m
    assert m["auroc_by_kind"]["op"] >= 0.60, m
    op = m["operating_points"][0]
    assert op["delta"] == 0.7 and op["precision"] >= 0.97, op


def test_prm_meets_issue_bar(prm_metrics_fresh):
    """Issue 14: at delta 0.7 precision >= 0.99 and recall >= 0.9; AUROC >= 0.97 on the operation steps."""
    m = prm_metrics_fresh
    op = m["operating_points"][0]
    assert op["delta"] == 0.7
    assert op["precision"] >= 0.99 and op["recall"] >= 0.9, op
    assert m["auroc_by_kind"]["op"] >= 0.97, m


def test_prm_adapter_batching_and_positions(tok, fresh):
    from rsd_batch.prms.math_shepherd import MathShepherdPRM, format_input

    prm = MathShepherdPRM.from_pretrained(str(MODELS / "prm"))
    probs = fresh[:6]
    steps = [p.reference_steps() for p in probs]
    batched = prm.score([p.text for p in probs], steps)
    single = [prm.score([p.text], [s])[0] for p, s in zip(probs, steps)]
    for b, s, st in zip(batched, single, steps):
        assert len(b) == len(st)
        assert max(abs(x - y) for x, y in zip(b, s)) < 1e-5
    ids, pos = prm.encode(probs[0].text, steps[0])
    assert [ids[i] for i in pos] == [tok.convert_tokens_to_ids("ки")] * len(steps[0])
    assert format_input("P", [" a. ", "b."]) == "P a. ки\nb. ки\n"
