"""The published models' own tokenizers, rebuilt offline (tests/real_tokenizers.py), against the
adapters and the engine: every PRM input of a short RSD run is what each model card's own usage
code builds from the same text, and steps split on Qwen's real merged delimiter tokens."""
from __future__ import annotations

import copy
import json
import unicodedata
from pathlib import Path

import pytest
import torch

from rsd_batch.engine import StepStopper
from rsd_batch.engine.steps import split_into_steps
from rsd_batch.methods import Context, Task, get_method
from rsd_batch.prms import load_prm
from rsd_batch.runner import load_models

from conftest import SHARED_DATA, make_config
from real_tokenizers import QWEN_SPLIT, mistral_tokenizer, qwen_ranks, qwen_tokenizer

tiktoken = pytest.importorskip("tiktoken")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return qwen_tokenizer(tmp_path_factory.mktemp("qwen"))


def test_qwen_vocabulary_reproduces_tiktoken_on_the_five_sets(qwen):
    enc = tiktoken.Encoding("qwen", pat_str=QWEN_SPLIT, mergeable_ranks=qwen_ranks(), special_tokens={})
    ids = {"\n\n": 271, ".\n\n": 382, "\n": 198, ".\n": 624, ":\n\n": 1447, ")\n\n": 692, "\n\n\n": 1406, "$\n\n": 66426}
    assert {s: qwen.encode(s) for s in ids} == {s: [i] for s, i in ids.items()}
    n = 0
    for path in sorted(SHARED_DATA.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            for value in json.loads(line).values():
                if isinstance(value, str):
                    want = enc.encode(unicodedata.normalize("NFC", value))
                    assert qwen.encode(value) == want, (path.name, value[:80])
                    n += len(want)
    assert n > 500_000
    assert len(qwen) == 151_665 and qwen.convert_tokens_to_ids("<|im_end|>") == 151_645


def test_mistral_vocabulary_gives_the_math_shepherd_card_ids(tmp_path):
    tok = mistral_tokenizer(tmp_path / "mistral")
    assert tok.encode("+ -")[1:] == [648, 387] and tok.encode("ки")[-1] == 12902
    assert tok.encode("Ann")[0] == tok.bos_token_id == 1


def test_steps_split_on_qwens_merged_delimiters(qwen):
    """Each way a Qwen step can end: the delimiter merged with '.', ':', '$' or ')', a run of three
    newlines (one token), and EOS."""
    steps = ["We add the two numbers.\n\n", "So the sum is:\n\n", "$x = 5$\n\n", "The pair is (1, 2)\n\n",
             "Then we check it\n\n\n", "The answer is $\\boxed{5}$"]
    eos = qwen.convert_tokens_to_ids("<|im_end|>")
    tokens = qwen.encode("".join(steps)) + [eos]
    ends = {382, 1447, 66426, 692, 1406}
    assert ends <= set(tokens)  # each ending really is one merged token here
    stopper = StepStopper(qwen, "\n\n")
    cut, left = split_into_steps(tokens, stopper, {eos}, max_steps=64)
    assert left == 0 and [o.reason for o in cut] == ["step"] * 5 + ["eos"]
    assert [qwen.decode(o.tokens, skip_special_tokens=True) for o in cut] == steps
    # max_steps cuts after the third step and says how many tokens it dropped
    cut, left = split_into_steps(tokens, stopper, {eos}, max_steps=3)
    assert len(cut) == 3 and left == len(tokens) - sum(len(o.tokens) for o in cut)


# ---------------------------------------------------------------- each PRM's model card, by hand


def card_skywork(tok, problem: str, steps: list[str]):
    """Skywork-o1-Open-PRM's `prepare_input`: bos + problem + "\\n", the response split at "\\n\\n",
    each piece encoded alone, the step token after every piece but the last."""
    prompt = tok.encode(tok.bos_token + problem + "\n")
    step_token = tok.encode("\n\n")[-1]
    parts = "".join(steps).split("\n\n")
    ids, flags = list(prompt), []
    for i, part in enumerate(parts):
        if part != "":
            ids += tok.encode(part)
            if i != len(parts) - 1:
                ids.append(step_token)
                flags.append(len(ids) - 1)
    return ids, flags


def card_qwen_prm(tok, problem: str, steps: list[str], system: str):
    """Qwen2.5-Math-PRM's card: the steps joined with <extra_0> as the assistant turn."""
    parts = [p for p in "".join(steps).split("\n\n") if p]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": problem},
                {"role": "assistant", "content": "<extra_0>".join(parts) + "<extra_0>"}]
    ids = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False))
    sep = tok.encode("<extra_0>")[0]
    return ids, [i for i, t in enumerate(ids) if t == sep]


def card_math_shepherd(tok, problem: str, steps: list[str]):
    """math-shepherd-mistral-7b-prm's card: `tokenizer.encode(f"{question} {output}")`, the output being
    each step followed by " ки\\n"; rewards at the ки tokens."""
    output = "".join(s.strip() + " ки\n" for s in "".join(steps).split("\n\n") if s)
    ids = tok.encode(f"{problem} {output}")
    tag = tok.encode("ки")[-1]
    return ids, [i for i, t in enumerate(ids) if t == tag]


def card_rlhflow(tok, problem: str, steps: list[str]):
    """RLHFlow's PRM evaluation: each step a user turn (the first with the question), "+" answers; the
    reward of a step is read at the position that predicts its "+" (`logits[:, -3]` of its chat)."""
    parts = [p for p in "".join(steps).split("\n\n") if p]
    conversation, flags = [], []
    for k, part in enumerate(parts):
        conversation += [{"role": "user", "content": f"{problem} {part.strip()}" if k == 0 else part.strip()},
                         {"role": "assistant", "content": "+"}]
        # apply_chat_template(..., return_tensors="pt") in the card: the rendered chat, its own BOS only
        ids = tok.encode(tok.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)
        flags.append(len(ids) - 3)
    return ids, flags


LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}")


@pytest.fixture(scope="module")
def real_prms(tmp_path_factory, qwen):
    """A tiny random PRM of each format on its real tokenizer (RLHFlow: Qwen's vocabulary with Llama 3's
    chat format, since no package ships Llama 3's vocabulary), in the weight layout its authors publish:
    Skywork pytorch_model.bin, Qwen2.5-Math-PRM sharded safetensors, Math-Shepherd sharded .bin."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from prm_checkpoints import _save_with_head, relayout

    root = tmp_path_factory.mktemp("real_prms")
    g = torch.Generator().manual_seed(0)

    def qwen2(tok, seed, cls=Qwen2ForCausalLM, config=Qwen2Config, tie=False):
        torch.manual_seed(seed)
        return cls(config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                          tie_word_embeddings=tie, pad_token_id=tok.pad_token_id))

    out = {}
    sky = copy.deepcopy(qwen)
    sky.bos_token = "<|im_start|>"  # Skywork's special_tokens_map
    out["skywork"] = _save_with_head(qwen2(sky, 1), sky, root / "skywork", "Qwen2ForPrmModel",
                                     {"v_head.summary.weight": torch.randn(1, 32, generator=g),
                                      "v_head.summary.bias": torch.randn(1, generator=g)})
    qprm = qwen_tokenizer(root / "qwen_prm_tok", prm=True)
    out["qwen_prm"] = _save_with_head(
        qwen2(qprm, 2), qprm, root / "qwen_prm", "Qwen2ForProcessRewardModel",
        {"score.0.weight": torch.randn(32, 32, generator=g), "score.0.bias": torch.randn(32, generator=g),
         "score.2.weight": torch.randn(2, 32, generator=g), "score.2.bias": torch.randn(2, generator=g)})
    mis = mistral_tokenizer(root / "math_shepherd")
    model = qwen2(mis, 3, LlamaForCausalLM, LlamaConfig)
    model.save_pretrained(str(root / "math_shepherd"))
    out["math_shepherd"] = str(root / "math_shepherd")
    llama = copy.deepcopy(qwen)
    llama.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>",
                                                            "<|end_header_id|>", "<|eot_id|>"]})
    llama.bos_token, llama.chat_template = "<|begin_of_text|>", LLAMA3
    model = qwen2(llama, 4, LlamaForCausalLM, LlamaConfig)
    model.save_pretrained(str(root / "rlhflow"))
    llama.save_pretrained(str(root / "rlhflow"))
    out["rlhflow"] = str(root / "rlhflow")
    published = {"skywork": "pytorch_model.bin", "qwen_prm": "model.safetensors.index.json",
                 "math_shepherd": "pytorch_model.bin.index.json", "rlhflow": "model.safetensors.index.json"}
    return {fmt: relayout(path, root / f"{fmt}_published", published[fmt]) for fmt, path in out.items()}


@pytest.fixture(scope="module")
def qwen_policies(tmp_path_factory, qwen):
    """Random draft and target on Qwen's vocabulary and the Qwen2.5-Math chat template. Their lm_head
    rows for merged-delimiter tokens point along (or against) the final norm, so whichever way a hidden
    state leans, some delimiter token is likely and sampled steps end on them every few tokens."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("qwen_policies")
    paths = {}
    for role, seed in (("draft", 5), ("target", 6)):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(qwen), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=2048, tie_word_embeddings=False,
                                             eos_token_id=qwen.eos_token_id, pad_token_id=qwen.pad_token_id))
        with torch.no_grad():
            for t in (382, 1447, 692, 66426):
                model.lm_head.weight[t] = model.model.norm.weight * 1.5
            for t in (271, 1406):
                model.lm_head.weight[t] = model.model.norm.weight * -1.5
        model.generation_config.eos_token_id = qwen.eos_token_id
        model.save_pretrained(str(root / role))
        qwen.save_pretrained(str(root / role))
        paths[role] = str(root / role)
    return paths


@pytest.mark.parametrize("fmt", ["skywork", "qwen_prm", "math_shepherd", "rlhflow"])
def test_every_prm_call_of_an_rsd_run_is_the_model_cards_input(fmt, real_prms, qwen_policies):
    """A short sampled RSD run with each PRM format: for every step the PRM scored (kept or rejected),
    the reward equals the card's own procedure run on the card's own token ids, and the adapter's ids
    and reward positions are the card's."""
    problems = [json.loads(line)["problem"] for line in (SHARED_DATA / "math500.jsonl").read_text().splitlines()[:6]]
    cfg = make_config(f"model.draft.path={qwen_policies['draft']}", f"model.target.path={qwen_policies['target']}",
                      f"prm.format={fmt}", f"prm.path={real_prms[fmt]}", "prm.dtype=float32", "method=rsd",
                      "method.temperature=1.0", "method.threshold=0.5", "method.max_new_tokens=40",
                      "prompt=qwen25-math-cot")
    method = get_method("rsd")
    models = load_models(cfg, method.roles(cfg.method))
    results = dict(method.run([Task(str(i), 0, p) for i, p in enumerate(problems)],
                              Context(models, cfg.method, cfg.prompt, cfg.run.seed, 4)))
    hf = load_prm(cfg.prm).adapter
    tok = hf.tokenizer
    card = {"skywork": lambda p, s: card_skywork(tok, p, s),
            "qwen_prm": lambda p, s: card_qwen_prm(tok, p, s, hf.system),
            "math_shepherd": lambda p, s: card_math_shepherd(tok, p, s),
            "rlhflow": lambda p, s: card_rlhflow(tok, p, s)}[fmt]
    checked = 0
    for task, result in results.items():
        committed = []
        for step in result.steps:
            scored = step.text if step.accepted else step.rejected_text
            reward = step.reward if step.accepted else step.rejected_reward
            call = committed + [scored]
            committed.append(step.text)
            # The card scores a piece only when the delimiter follows it; pieces with a run of three
            # newlines are split differently by `str.split` (README, "Real model families").
            if not scored.endswith("\n\n") or "\n\n\n" in "".join(call):
                continue
            ids, flags = card(task.problem, call)
            mine, positions = hf.encode(task.problem, call)
            # The same tokens up to the last reward (a chat's closing tokens after it change no score).
            assert mine[:flags[-1] + 1] == ids[:flags[-1] + 1] and positions == flags, (fmt, call)
            with torch.no_grad():
                hidden = hf.backbone(input_ids=torch.tensor([ids])).last_hidden_state[0, flags[-1]]
                card_reward = float(hf.rewards_from_hidden(hidden[None])[0])
            assert abs(card_reward - reward) < 1e-4
            checked += 1
    assert checked >= 5, checked
