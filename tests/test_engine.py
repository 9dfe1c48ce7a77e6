"""The step-batched engine and RSD: equivalences, batch invariance, caches against recomputation."""
from __future__ import annotations

import torch
import pytest

from rsd_batch.config import Weighting
from rsd_batch.engine import SamplingParams, Seq, StepStopper, generate_step, run_rounds, sample_generator, score_steps
from rsd_batch.methods import Context, Task, get_method
from rsd_batch.methods.rsd import acceptance_weight
from rsd_batch.models import load_causal_lm, render_prompt
from rsd_batch.prms import load_prm
from rsd_batch.runner import load_models

from conftest import make_config


def run_method(args, *overrides, tasks):
    cfg = make_config(*args, *overrides)
    method = get_method(cfg.method.name.value)
    ctx = Context(load_models(cfg, method.roles(cfg.method)), cfg.method, cfg.prompt, cfg.run.seed, cfg.run.batch_size)
    return {(t.id, t.sample_index): r for t, r in method.run(tasks, ctx)}


@pytest.fixture(scope="module")
def tasks(toy_problems):
    import json
    rows = [json.loads(line) for line in toy_problems.read_text().splitlines()]
    return [Task(r["id"], k, r["problem"]) for r in rows[:16] for k in range(2)]


# Random-init models rarely write "\n\n"; a common letter as the delimiter gives many short steps,
# some ending inside a merged token, so the multi-step paths are really exercised.
SAMPLED = ["method.temperature=0.9", "method.max_new_tokens=24", "run.batch_size=8",
           "method.step_delimiter=e"]


def test_rsd_accepting_everything_is_draft_only(tiny_run_args, tasks):
    rsd = run_method(tiny_run_args, *SAMPLED, "method=draft_only", "method.name=rsd",
                     "method.threshold=0.0", tasks=tasks)
    draft = run_method(tiny_run_args, *SAMPLED, "method=draft_only", tasks=tasks)
    assert rsd.keys() == draft.keys() and len(rsd) == 32
    for k in rsd:
        assert rsd[k].output == draft[k].output
        assert all(s.source == "draft" and s.accepted for s in rsd[k].steps)
        assert rsd[k].ledger.target.flops == 0 and rsd[k].ledger.prm.flops > 0
    assert sum(len(r.steps) for r in rsd.values()) >= 3 * len(rsd)


def test_rsd_rejecting_everything_is_target_only(tiny_run_args, tasks):
    rsd = run_method(tiny_run_args, *SAMPLED, "method.name=rsd", "method.threshold=1.5", tasks=tasks)
    target = run_method(tiny_run_args, *SAMPLED, "method=target_only", tasks=tasks)
    for k in rsd:
        assert rsd[k].output == target[k].output
        assert all(s.source == "target" and s.rejected_text is not None for s in rsd[k].steps)
        led = rsd[k].ledger
        # With caches the target processes exactly what it would alone.
        assert led.target.flops == target[k].ledger.target.flops == led.target_only_flops
        assert led.draft.discarded_tokens == led.draft.generated_tokens > 0


def test_output_does_not_depend_on_batch(tiny_run_args, tasks):
    args = [*tiny_run_args, *SAMPLED, "method.name=rsd", "method.weighting=linear"]
    together = run_method(args, "run.batch_size=64", tasks=tasks)
    for task in tasks[:6]:
        alone = run_method(args, "run.batch_size=1", tasks=[task])
        assert alone[(task.id, task.sample_index)].output == together[(task.id, task.sample_index)].output
    no_refill = run_method(args, "run.batch_size=5", "method.refill=false", tasks=tasks)
    assert {k: r.output for k, r in no_refill.items()} == {k: r.output for k, r in together.items()}


def test_weightings():
    cfg = make_config("method.name=rsd", "method.threshold=0.5", "method.sigmoid_tau=0.1",
                      "method.constant=0.3").method
    def w(kind, r):
        cfg.weighting = kind
        return acceptance_weight(r, cfg)
    assert (w(Weighting.binary, 0.49), w(Weighting.binary, 0.5)) == (0.0, 1.0)
    assert w(Weighting.constant, 0.9) == 0.3 and w(Weighting.linear, 0.42) == 0.42
    assert (w(Weighting.clipped, 0.25), w(Weighting.clipped, 0.8)) == (0.5, 1.0)
    assert w(Weighting.sigmoid, 0.5) == 0.5 and w(Weighting.sigmoid, 0.8) > 0.95


def _from_scratch_greedy(model, tokens, stopper, eos, limit):
    """The reference: every token from a full forward over the whole sequence, no cache at all."""
    out = []
    for _ in range(limit):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokens + out])).logits[0, -1]
        out.append(int(logits.argmax()))
        if out[-1] in eos or stopper.done(out):
            break
    return out


def test_cached_steps_and_rewards_equal_recomputation(tiny_models, toy_problems):
    import json
    cfg = make_config(f"model.draft.path={tiny_models['draft']}", f"model.target.path={tiny_models['target']}",
                      f"prm.path={tiny_models['prm']}")
    draft, target = load_causal_lm(cfg.model.draft, "draft"), load_causal_lm(cfg.model.target, "target")
    prm = load_prm(cfg.prm)
    # Greedy random models write "\n" after "\n": each step ends on a delimiter split over two tokens.
    stopper = StepStopper(draft.tokenizer, "\n\n")
    problems = [json.loads(line)["problem"] for line in toy_problems.read_text().splitlines()[:5]]
    seqs = []
    for i, p in enumerate(problems):
        prompt = draft.encode(render_prompt(draft.tokenizer, p, cfg.prompt))
        seqs.append(Seq(key=i, problem=p, tokens=prompt, prompt_len=len(prompt), budget=30 + 5 * i,
                        generators={r: sample_generator(0, str(i), 0, r) for r in ("draft", "target")}))
    greedy = SamplingParams()
    from rsd_batch.methods import Step
    for round_ in range(6):  # alternate models so each must catch up on the other's tokens
        live = [s for s in seqs if not s.finish_reason]
        if not live:
            break
        lm = draft if round_ % 2 == 0 else target
        before = [list(s.tokens) for s in live]
        outs = generate_step(lm, live, greedy, stopper)
        texts = [lm.decode(o.tokens) for o in outs]
        rewards = score_steps(prm, live, texts, max_batch_tokens=64)  # small budget: several groups
        for s, o, text, r, prefix in zip(live, outs, texts, rewards, before):
            assert o.tokens == _from_scratch_greedy(lm.model, prefix, stopper, lm.eos_ids, s.left)
            full = prm.score([s.problem], [[st.text for st in s.steps] + [text]])[0][-1]
            assert abs(full - r) < 1e-5
            s.commit(o.tokens, Step(text, lm.role, r), o.reason, max_steps=5)
    assert sum(len(s.steps) for s in seqs) >= 3 * len(seqs)


def test_a_row_far_behind_catches_up_apart_with_the_same_tokens_and_ledger(tiny_models, toy_problems):
    """A new prompt joining rows that lack one token each: it reads all but its last token in a
    forward of its own (one padded batch would be mostly padding), then decodes with the others —
    the same tokens as a forward over the whole sequence, and a ledger as if it had prefilled at once."""
    import json
    from rsd_batch.engine.hf import _catch_up

    cfg = make_config(f"model.target.path={tiny_models['target']}")
    lm = load_causal_lm(cfg.model.target, "target")
    stopper = StepStopper(lm.tokenizer, "\n\n")
    problems = [json.loads(line)["problem"] for line in toy_problems.read_text().splitlines()[:4]]

    def new_seq(i):
        prompt = lm.encode(render_prompt(lm.tokenizer, problems[i], cfg.prompt))
        return Seq(key=i, problem=problems[i], tokens=prompt, prompt_len=len(prompt), budget=12,
                   generators={"target": sample_generator(0, str(i), 0, "target")})

    seqs = [new_seq(i) for i in range(3)]
    for s, o in zip(seqs, generate_step(lm, seqs, SamplingParams(), stopper)):
        s.extend(o.tokens, "target", False)
    late = new_seq(3)
    lengths = [s.cache("target").length for s in seqs]
    assert [len(s.tokens) - n for s, n in zip(seqs, lengths)] == [1, 1, 1]
    _catch_up(lm, seqs + [late])
    assert late.cache("target").length == len(late.tokens) - 1  # all but its last token, apart
    assert [s.cache("target").length for s in seqs] == lengths  # the others untouched
    before = [list(s.tokens) for s in seqs + [late]]
    outs = generate_step(lm, seqs + [late], SamplingParams(), stopper)
    for s, o, prefix in zip(seqs + [late], outs, before):
        assert o.tokens == _from_scratch_greedy(lm.model, prefix, stopper, lm.eos_ids, 12 - (len(prefix) - s.prompt_len))
    t, n = late.ledger.target, late.prompt_len
    assert t.prefill_tokens == n and t.prefill_flops == lm.cost.forward_flops(n, 0, 1)


def test_rows_leaving_a_decode_move_only_the_rows_past_the_new_end(tiny_models):
    """Rows 0 and 2 of four leave mid-decode: row 3 fills hole 0 and the cache shrinks in place (same
    buffer, one row copied); the two left go on with the logits of a forward without a cache."""
    from transformers import AutoModelForCausalLM
    from rsd_batch.engine.kv import KVBatch, RowKV

    model = AutoModelForCausalLM.from_pretrained(tiny_models["target"]).eval()
    seqs = [[5 + i, 9, 17 + i, 30, 4][: 2 + i] for i in range(4)]  # 2..5 tokens: left padding differs
    with torch.inference_mode():
        batch = KVBatch(model, "cpu", 0, [RowKV() for _ in seqs], seqs)
        batch.forward_chunk()
        batch.forward_next([40, 41, 42, 43])
        seqs = [s + [40 + i] for i, s in enumerate(seqs)]
        layer = batch.cache.layers[0]
        buffer = layer.buf_k.data_ptr()
        order = batch.keep([1, 3])
        assert order == [3, 1] and batch.rows == [3, 1]
        assert layer.buf_k.data_ptr() == buffer and layer.keys.shape[0] == 2  # moved, not re-gathered
        assert batch.own_mask  # the decode hands the model its 4D mask: checked against no cache at all
        logits = batch.forward_next([50, 51]).logits[:, -1]
        for b, (row, tok) in enumerate(zip(order, [50, 51])):
            full = model(input_ids=torch.tensor([seqs[row] + [tok]])).logits[0, -1]
            assert torch.allclose(logits[b], full, atol=1e-4), row


def test_a_model_with_a_sliding_window_or_eager_attention_gets_transformers_masks(tiny_models):
    """The decode builds its own 4D mask only where transformers would build the same one."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from rsd_batch.engine.kv import own_mask

    assert own_mask(AutoModelForCausalLM.from_pretrained(tiny_models["target"]))
    assert not own_mask(AutoModelForCausalLM.from_pretrained(tiny_models["target"], attn_implementation="eager"))
    cfg = AutoConfig.from_pretrained(tiny_models["target"])
    cfg.use_sliding_window, cfg.sliding_window, cfg.max_window_layers = True, 4, 0
    cfg.layer_types = ["sliding_attention"] * cfg.num_hidden_layers
    assert not own_mask(AutoModelForCausalLM.from_config(cfg))


def test_step_stopper_with_merged_and_split_delimiters(toy_tokenizer):
    tok = toy_tokenizer
    stop = StepStopper(tok, "\n\n")
    merged = tok.encode("28 * 2 = 56.\n\n", add_special_tokens=False)
    assert tok.decode(merged[-1:]) == ".\n\n"  # the Qwen2 split lets ".\n\n" be one token
    assert not stop.done(merged[:-1]) and stop.done(merged)
    nl = tok.encode("\n", add_special_tokens=False)
    assert len(nl) == 1
    word = tok.encode("Ann", add_special_tokens=False)
    assert not stop.done(word + nl) and stop.done(word + nl + nl)  # split over two tokens
    assert not stop.done(nl + word)
    # A delimiter of several characters that no single token holds.
    stop_the = StepStopper(tok, "answer is")
    ids = tok.encode("The answer is \\boxed{4}.", add_special_tokens=False)
    ends = [i for i in range(1, len(ids) + 1) if stop_the.done(ids[:i])]
    assert ends and tok.decode(ids[:ends[0]]).endswith("is")


# ---------------------------------------------------------------- the other baselines


def test_greedy_sd_is_greedy_target_token_for_token(tiny_run_args, tiny_models, tasks):
    # A draft whose greedy choices vary: it disagrees with the target often, so rejections happen.
    greedy = ["method.max_new_tokens=24", "run.batch_size=8", "method.temperature=0",
              f"model.draft.path={tiny_models['wild']}"]
    sd = run_method(tiny_run_args, *greedy, "method=sd", "method.speculative_tokens=3", tasks=tasks)
    target = run_method(tiny_run_args, *greedy, "method=target_only", tasks=tasks)
    assert all(sd[k].output == target[k].output for k in sd)
    led = [r.ledger for r in sd.values()]
    assert sum(x.draft.generated_tokens for x in led) > 0 and sum(x.draft.discarded_tokens for x in led) > 0


def test_sampling_sd_follows_the_target_distribution(tiny_models, tiny_run_args):
    """2,000 first tokens from sd against the target's own next-token distribution (chi-square)."""
    from scipy.stats import chisquare

    args = [*tiny_run_args, "method.max_new_tokens=1", "method.temperature=1.0", "method.top_k=8",
            "run.batch_size=256"]
    task = Task("p", 0, "Ann has 3 coins. She buys 2 more. How many coins does Ann have now?")
    tasks = [Task("p", i, task.problem) for i in range(2000)]
    firsts = [r.output for r in run_method(args, "method=sd", "method.speculative_tokens=2", tasks=tasks).values()]
    cfg = make_config(*args)
    target = load_causal_lm(cfg.model.target, "target")
    draft = load_causal_lm(cfg.model.draft, "draft")

    def dist(lm):
        ids = lm.encode(render_prompt(lm.tokenizer, task.problem, cfg.prompt))
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
        from rsd_batch.engine import filtered_probs
        return filtered_probs(logits[None], SamplingParams(1.0, 1.0, 8))[0]

    p, q = dist(target), dist(draft)
    # Outputs are text, and byte-level tokens can share one (e.g. "\ufffd"): compare per distinct text.
    by_text: dict[str, list[int]] = {}
    for i in torch.nonzero(p).flatten().tolist():
        by_text.setdefault(target.decode([i]), []).append(i)
    texts = list(by_text)
    counts = [sum(f == t for f in firsts) for t in texts]
    assert sum(counts) == len(firsts)  # every sample is one of the target's top-8 tokens
    def expected(weights):
        total = sum(weights)
        out = [w / total * len(firsts) for w in weights]
        out[-1] = len(firsts) - sum(out[:-1])  # sums must agree exactly
        return out

    assert chisquare(counts, expected([sum(float(p[i]) for i in by_text[t]) for t in texts])).pvalue > 1e-3
    # The draft alone could not pass: most of its mass lies outside the target's top-8 tokens,
    # so every sample landing inside them is the verification at work.
    assert sum(float(q[i]) for ids in by_text.values() for i in ids) < 0.5


def test_best_of_n_picks_the_best_candidate_and_pays_for_all(tiny_run_args, tasks):
    from rsd_batch.config import Aggregation
    from rsd_batch.methods.search import aggregate

    assert aggregate([0.9, 0.2, 0.5], Aggregation.last) == 0.5
    assert aggregate([0.9, 0.2, 0.5], Aggregation.min) == 0.2
    assert abs(aggregate([0.9, 0.2, 0.5], Aggregation.prod) - 0.09) < 1e-12
    assert abs(aggregate([0.9, 0.2, 0.4], Aggregation.mean) - 0.5) < 1e-12
    args = [*tiny_run_args, *SAMPLED, "method=best_of_n", "method.aggregation=min"]
    one = run_method(args, "method.candidates=1", tasks=tasks[:8])
    four = run_method(args, "method.candidates=4", tasks=tasks[:8])
    for k in one:
        # Candidate #0 is the same in both runs (its own generators), so 4 can only do better.
        score = lambda r: min(s.reward for s in r.steps)  # noqa: E731
        assert score(four[k]) >= score(one[k])
        assert four[k].ledger.target.generated_tokens >= one[k].ledger.target.generated_tokens
        assert four[k].ledger.prm.flops > one[k].ledger.prm.flops
        assert all(s.reward is not None and s.source == "target" for s in four[k].steps)


def test_beam_search_of_one_greedy_beam_is_greedy_target(tiny_run_args, tasks):
    greedy = ["method.max_new_tokens=24", "method.temperature=0", "method.step_delimiter=e",
              "method.max_steps=64"]
    beam = run_method(tiny_run_args, *greedy, "method=beam_search", "method.candidates=1",
                      "method.beam_width=1", tasks=tasks[:8])
    target = run_method(tiny_run_args, *greedy, "method=target_only", tasks=tasks[:8])
    assert all(beam[k].output == target[k].output for k in beam)
    wide = run_method(tiny_run_args, *SAMPLED, "method=beam_search", "method.candidates=4",
                      "method.beam_width=2", "method.max_steps=6", tasks=tasks[:4])
    for r in wide.values():
        assert r.finish_reason in ("eos", "max_tokens", "max_steps") and r.steps
        # paid for: at least the kept steps' tokens (every expanded candidate costs more)
        assert r.ledger.target.generated_tokens >= len(r.steps) > 0
        assert r.ledger.prm.prefill_tokens > 0


# ---------------------------------------------------------------- vocabularies that differ


@pytest.fixture(scope="module")
def wide_target(tmp_path_factory, toy_tokenizer):
    """A target with 64 embedding rows more than the tokenizer and the draft (Qwen2.5-Math 7B against
    1.5B: 152,064 against 151,936 rows). Random weights give those ids real probability."""
    from rsd_batch.toy.build import new_model, save_model
    model = new_model(toy_tokenizer, seed=5, num_layers=1, hidden_size=32, initializer_range=0.6)
    model.resize_token_embeddings(len(toy_tokenizer) + 64, mean_resizing=False)
    with torch.no_grad():
        model.get_output_embeddings().weight[len(toy_tokenizer):] *= 8  # make the extra ids likely
    return str(save_model(model, toy_tokenizer, tmp_path_factory.mktemp("wide") / "target"))


def test_no_id_past_the_smaller_vocabulary_is_ever_sampled(tiny_run_args, wide_target, tasks, toy_tokenizer):
    vocab = len(toy_tokenizer)
    cfg = make_config(*tiny_run_args, f"model.target.path={wide_target}")
    models = load_models(cfg, ("draft", "target"))
    target = models["target"]
    assert target.vocab_size == vocab + 64 and target.vocab_limit == vocab == models["draft"].vocab_limit
    # Unmasked, the wide target does emit the extra ids: the hazard is real.
    with torch.no_grad():
        ids = target.encode(render_prompt(target.tokenizer, tasks[0].problem, cfg.prompt))
        probs = target.model(input_ids=torch.tensor([ids])).logits[0, -1].softmax(-1)
    assert float(probs[vocab:].sum()) > 0.05
    params = SamplingParams(temperature=1.0)
    drawn = []
    for k in range(20):
        seqs = [Seq(key=i, problem=t.problem, tokens=list(ids), prompt_len=len(ids), budget=24,
                    generators={"target": sample_generator(k, t.id, i, "target")}) for i, t in enumerate(tasks)]
        for out in generate_step(target, seqs, params, StepStopper(target.tokenizer, "e")):
            drawn += out.tokens
    assert len(drawn) > 1000 and max(drawn) < vocab
    # Every method that writes one sequence with both models runs to the end, sampled.
    for method in ("rsd", "sd"):
        out = run_method(tiny_run_args, *SAMPLED, f"method={method}", f"model.target.path={wide_target}",
                         "method.weighting=linear", tasks=tasks)
        assert len(out) == len(tasks) and all(r.error is None for r in out.values())


def test_kv_held_stays_inside_the_memory_plan(toy_problems):
    """The HF engine counts the KV bytes a step holds at its peak (every copy: the rows' caches, the
    gathered batch with its spare room, the extracted caches); the plan's budget per sequence bounds
    it for the real lengths, and the count is not a loose guess: it exceeds one copy."""
    import json
    from rsd_batch.models import HF_KV_COPIES, memory_plan

    cfg = make_config("method=target_only", "method.max_new_tokens=96", "run.batch_size=16")
    rows = [json.loads(line) for line in toy_problems.read_text().splitlines()[:16]]
    tasks = [Task(r["id"], 0, r["problem"]) for r in rows]
    models = load_models(cfg, ("target",))
    done = {t.id: r for t, r in get_method("target_only").run(
        tasks, Context(models, cfg.method, cfg.prompt, 0, 16))}
    plan = {p["role"]: p for p in memory_plan(cfg, ("target",), 16)}["target"]
    lm = models["target"]
    lengths = [len(lm.encode(render_prompt(lm.tokenizer, t.problem, cfg.prompt))) + done[t.id].ledger.target.generated_tokens
               for t in tasks]
    per_token = plan["kv_bytes_per_token"]
    assert plan["kv_copies"] == HF_KV_COPIES and plan["devices"] == ["cpu"]
    assert per_token * sum(lengths) < lm.kv_peak_bytes <= per_token * max(lengths) * len(tasks) * HF_KV_COPIES
    assert plan["kv_bytes"] >= per_token * max(lengths) * len(tasks) * HF_KV_COPIES


def test_parked_samples_give_their_place_in_the_batch():
    """run_rounds with `parked` (RSD's samples waiting for the target): the batch the others decode
    stays full while some wait, every key runs once, and each leaves when it finishes."""
    waiting: set[int] = set()
    rounds: list[tuple[list[int], set[int]]] = []
    age: dict[int, int] = {}

    def start(k):
        return Seq(key=k, problem="", tokens=[0], prompt_len=1, budget=8, generators={})

    def round_fn(active):
        rounds.append(([s.key for s in active], set(waiting)))
        for s in active:
            age[s.key] = age.get(s.key, 0) + 1
            if s.key % 3 == 0 and age[s.key] == 1:
                waiting.add(s.key)  # rejected: parked for the next round
            elif s.key in waiting and age[s.key] < 3:
                continue
            else:
                waiting.discard(s.key)
                s.finish("eos")

    done = [s.key for s in run_rounds(range(10), 2, True, start, round_fn, parked=lambda: len(waiting))]
    assert sorted(done) == list(range(10))
    assert all(len([k for k in keys if k not in parked]) <= 2 for keys, parked in rounds)
    assert max(len(keys) for keys, _ in rounds) == 4  # two parked (0 and 3) beside a full batch
    assert rounds[1][0] == [0, 2, 3]  # 0 waits; 1 finished; 2 and 3 take the places
    # without parking the batch is the batch: never more than two in flight
    rounds.clear(), age.clear(), waiting.clear()
    assert sorted(s.key for s in run_rounds(range(10), 2, True, start, round_fn)) == list(range(10))
    assert max(len(keys) for keys, _ in rounds) == 2


def test_when_the_target_rewrites_changes_no_output(tiny_run_args, tasks):
    """RSD's target rewrites rejected steps when enough samples wait (method.rewrite_share): every round
    (0), at half the batch (0.5) or only when nothing else can go on (1) — the same texts, rewards and
    token counts; only the target's batches differ."""
    args = [*tiny_run_args, *SAMPLED, "method.name=rsd", "method.weighting=linear", "run.batch_size=8"]
    runs = [run_method(args, f"method.rewrite_share={x}", tasks=tasks) for x in (0.0, 0.5, 1.0)]
    for k in runs[0]:
        a = runs[0][k]
        for other in runs[1:]:
            b = other[k]
            assert a.output == b.output and [(s.text, s.accepted) for s in a.steps] == \
                [(s.text, s.accepted) for s in b.steps]
            # rewards agree up to float rounding (the PRM's batches are grouped differently)
            assert all(abs((x.reward or 0) - (y.reward or 0)) < 1e-5 for x, y in zip(a.steps, b.steps))
            assert a.ledger.target.generated_tokens == b.ledger.target.generated_tokens
    assert any(s.source == "target" for r in runs[0].values() for s in r.steps)


def test_drafting_ahead_changes_no_output_and_saves_draft_forwards(tiny_run_args, tasks, monkeypatch):
    """method.draft_ahead: a draft row whose step ends early begins its next one while the others
    finish theirs; that step is kept if the PRM accepts the one before, else dropped with its random
    draws. Sampled outputs, steps and rewards are those of a run without it; the draft decodes in
    fewer forwards, and what it wrote ahead and dropped is charged as generated and discarded."""
    from rsd_batch.engine import hf
    from rsd_batch.engine.kv import KVBatch

    forwards, role = {}, [None]
    decode, forward_next = hf._decode, KVBatch.forward_next

    def decode_as(lm, *a, **kw):
        role[0] = lm.role
        return decode(lm, *a, **kw)

    def counted(self, tokens, **kw):
        forwards[role[0]] = forwards.get(role[0], 0) + 1
        return forward_next(self, tokens, **kw)

    monkeypatch.setattr(hf, "_decode", decode_as)
    monkeypatch.setattr(KVBatch, "forward_next", counted)
    args = [*tiny_run_args, *SAMPLED, "method.name=rsd", "method.weighting=linear", "run.batch_size=8"]
    runs, counts = {}, {}
    for ahead in (False, True):
        forwards.clear()
        runs[ahead] = run_method(args, f"method.draft_ahead={str(ahead).lower()}", tasks=tasks)
        counts[ahead] = forwards.get("draft", 0)
    began_ahead = 0
    for k, a in runs[False].items():
        b = runs[True][k]
        assert a.output == b.output and [(s.text, s.source, s.accepted) for s in a.steps] == \
            [(s.text, s.source, s.accepted) for s in b.steps]
        assert all(abs((x.reward or 0) - (y.reward or 0)) < 1e-5 for x, y in zip(a.steps, b.steps))
        assert a.ledger.target.generated_tokens == b.ledger.target.generated_tokens
        kept = lambda led: led.draft.generated_tokens - led.draft.discarded_tokens  # noqa: E731
        assert kept(a.ledger) == kept(b.ledger)
        began_ahead += b.ledger.draft.generated_tokens - a.ledger.draft.generated_tokens
    assert any(s.source == "target" for r in runs[True].values() for s in r.steps)  # rejections dropped some
    assert began_ahead > 0  # ... and those tokens are charged
    assert counts[True] < counts[False]
