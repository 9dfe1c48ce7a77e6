"""PRM adapters, each on a tiny model built here in its real checkpoint format: reward positions,
padding and batch invariance, incremental (KV-cached) scoring equal to full scoring, loading."""
from __future__ import annotations

import pytest
import torch

from rsd_batch.engine import Seq, reject_candidate, score_steps
from rsd_batch.methods import Step
from rsd_batch.prms import load_prm

from conftest import make_config
from prm_checkpoints import LAYOUTS, build_prm_folders, relayout

PROBLEMS = ["Ann has 23 coins. She buys 5 more. How many coins does Ann have now?",
            "Ben has 7 apples. He doubles them. He gives 3 away. How many apples does Ben have now?",
            "What is 12 * 3?"]
STEPS = [["Ann starts with 23 coins.\n\n", "She buys 5 more: 23 + 5 = 28.\n\n", "The answer is \\boxed{28}."],
         ["Ben starts with 7 apples.\n\n", "He doubles them: 7 * 2 = 15.\n\n",
          "He gives 3 away: 15 - 3 = 12.\n\n", "The answer is \\boxed{12}."],
         ["12 * 3 = 36.\n\n", "The answer is \\boxed{36}."]]


@pytest.fixture(scope="module")
def prm_folders(tmp_path_factory, toy_tokenizer, tiny_models):
    return build_prm_folders(tmp_path_factory.mktemp("prms"), toy_tokenizer, tiny_models["prm"])


FORMATS = ["math_shepherd", "skywork", "qwen_prm", "rlhflow"]


def load(fmt, folders):
    return load_prm(make_config(f"prm.format={fmt}", f"prm.path={folders[fmt]}", "prm.dtype=float32").prm)


@pytest.mark.parametrize("fmt", FORMATS)
def test_reward_positions(fmt, prm_folders):
    prm = load(fmt, prm_folders).adapter
    tok = prm.tokenizer
    ids, pos = prm.encode(PROBLEMS[1], STEPS[1])
    assert len(pos) == len(STEPS[1]) and pos == sorted(pos)
    marker = {"math_shepherd": lambda i: ids[i] == tok.convert_tokens_to_ids("ки"),
              "skywork": lambda i: ids[i] == prm.step_token_id and tok.decode([ids[i]]).endswith("\n"),
              "qwen_prm": lambda i: tok.convert_ids_to_tokens(ids[i]) == "<extra_0>",
              "rlhflow": lambda i: ids[i + 1] == prm.good_id}[fmt]
    assert all(marker(p) for p in pos)
    text = tok.decode(ids)
    assert all(s.strip()[:12] in text for s in STEPS[1])
    if fmt == "qwen_prm":
        assert "Please reason step by step" in text and text.count("<extra_0>") == 4
    if fmt == "rlhflow":
        assert text.count("<|start_header_id|>user") == 4 and text.startswith("<|begin_of_text|>")
        assert PROBLEMS[1] in text.split("<|eot_id|>")[0]  # the problem rides in the first user turn
    if fmt == "skywork":
        assert ids[:len(prm.prefix_ids(PROBLEMS[1]))] == prm.prefix_ids(PROBLEMS[1])


@pytest.mark.parametrize("fmt", FORMATS)
def test_padding_and_batch_invariance(fmt, prm_folders):
    prm = load(fmt, prm_folders).adapter
    left = prm.score(PROBLEMS, STEPS, padding_side="left")
    right = prm.score(PROBLEMS, STEPS, padding_side="right")
    alone = [prm.score([p], [s])[0] for p, s in zip(PROBLEMS, STEPS)]
    many_p = [PROBLEMS[i % 3] for i in range(32)]
    many_s = [STEPS[i % 3][: 1 + i % len(STEPS[i % 3])] for i in range(32)]
    many = prm.score(many_p, many_s)
    for a, b, c in zip(left, right, alone):
        assert len(a) == len(b) == len(c) and all(0.0 <= x <= 1.0 for x in a)
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
        assert max(abs(x - y) for x, y in zip(a, c)) < 1e-5
    for i, r in enumerate(many):
        ref = alone[i % 3][: len(r)]
        assert max(abs(x - y) for x, y in zip(r, ref)) < 1e-5


@pytest.mark.parametrize("fmt", FORMATS)
def test_incremental_scoring_equals_full_scoring(fmt, prm_folders):
    """The engine's KV-cached scoring, with a rejected candidate in the middle, against score()."""
    prm = load(fmt, prm_folders)
    seqs = [Seq(key=i, problem=p, tokens=[0], prompt_len=1, budget=100, generators={})
            for i, p in enumerate(PROBLEMS)]
    committed = [[] for _ in PROBLEMS]
    for k in range(4):
        live = [i for i in range(3) if k < len(STEPS[i])]
        if k == 1:  # a candidate that is rejected, then replaced (as the target would)
            wrong = score_steps(prm, [seqs[i] for i in live], ["Wrong: 1 + 1 = 3.\n\n"] * len(live), 64)
            for i, r in zip(live, wrong):
                full = prm.score([PROBLEMS[i]], [committed[i] + ["Wrong: 1 + 1 = 3.\n\n"]])[0][-1]
                assert abs(full - r) < 1e-5
                reject_candidate(seqs[i])
                seqs[i].steps.append(Step(STEPS[i][k], "target"))
                seqs[i].prm_pending.append(STEPS[i][k])
                committed[i].append(STEPS[i][k])
            continue
        got = score_steps(prm, [seqs[i] for i in live], [STEPS[i][k] for i in live], 64)
        for i, r in zip(live, got):
            full = prm.score([PROBLEMS[i]], [committed[i] + [STEPS[i][k]]])[0][-1]
            assert abs(full - r) < 1e-5
            seqs[i].steps.append(Step(STEPS[i][k], "draft", r, True))
            committed[i].append(STEPS[i][k])
    # Only new tokens were read: the PRM processed each final token once, plus the rejected steps.
    for i, s in enumerate(seqs):
        final = len(prm.adapter.encode(PROBLEMS[i], committed[i])[0])
        assert final <= s.ledger.prm.prefill_tokens < final + 40


def test_a_checkpoint_without_its_head_is_refused(prm_folders, tmp_path):
    from rsd_batch.models import ModelLoadError
    with pytest.raises((ModelLoadError, ValueError), match="no tensor v_head.summary.weight, v_head.summary.bias "
                       r"\(looked in model.safetensors\)"):
        load("skywork", {"skywork": prm_folders["qwen_prm"]})


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_published_weight_layout_loads(layout, prm_folders, tiny_models, tmp_path):
    """PRMs (backbone and head) and policies load from each layout and score/decode as from safetensors."""
    from rsd_batch.models import load_causal_lm

    for fmt in ("skywork", "qwen_prm", "math_shepherd"):
        want = load(fmt, prm_folders).score(PROBLEMS, STEPS)
        got = load(fmt, {fmt: relayout(prm_folders[fmt], tmp_path / fmt, layout)}).score(PROBLEMS, STEPS)
        assert got == want
    cfg = make_config(f"model.target.path={relayout(tiny_models['target'], tmp_path / 'target', layout)}")
    lm = load_causal_lm(cfg.model.target, "target")
    ref = load_causal_lm(make_config(f"model.target.path={tiny_models['target']}").model.target, "target")
    assert all(torch.equal(a, b) for a, b in zip(lm.model.state_dict().values(), ref.model.state_dict().values()))


def test_a_folder_without_weights_says_what_it_looked_for(prm_folders, tmp_path):
    import shutil
    from rsd_batch.models import ModelLoadError
    empty = tmp_path / "no_weights"
    shutil.copytree(prm_folders["skywork"], empty, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ModelLoadError, match="pytorch_model.bin"):
        load("skywork", {"skywork": str(empty)})


def test_missing_model_files_are_named_before_anything_loads(prm_folders, tmp_path):
    import shutil
    from rsd_batch.models import ModelLoadError, check_model_files

    half = tmp_path / "half_downloaded"
    shutil.copytree(prm_folders["skywork"], half, ignore=shutil.ignore_patterns("*.safetensors"))
    cases = {str(half): "has no weights: none of model.safetensors.index.json, model.safetensors, "
                        "pytorch_model.bin.index.json, pytorch_model.bin",
             str(tmp_path / "nowhere"): "no such folder, and not a hub id",
             str(tmp_path): "has no config.json"}
    for path, message in cases.items():
        cfg = make_config("prm.format=skywork", f"prm.path={path}")
        with pytest.raises(ModelLoadError, match=message.replace(".", r"\.")):
            check_model_files(cfg, ("prm",))
    check_model_files(make_config("prm.path=Skywork/Skywork-o1-Open-PRM-Qwen-2.5-7B"), ("prm",))  # a hub id passes
