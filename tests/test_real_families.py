"""Real model families without their weights: prompts through the Qwen2.5 chat template, paper
presets, the memory plan on the real Qwen2.5-Math shapes."""
from __future__ import annotations

import pytest

from rsd_batch.models import ModelLoadError, check_memory, memory_plan, render_prompt
from rsd_batch.shapes import qwen2_config

from conftest import make_config

# The Qwen2.5-Instruct chat template's behaviour without tools: a given system message, or Qwen's
# default one, then ChatML turns.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


@pytest.fixture()
def qwen_tokenizer(toy_tokenizer):
    import copy
    tok = copy.deepcopy(toy_tokenizer)
    tok.chat_template = QWEN25_TEMPLATE
    return tok


def test_prompt_presets_render_through_the_qwen25_template(qwen_tokenizer):
    problem = "What is $1+1$?"
    cot = render_prompt(qwen_tokenizer, problem, make_config("prompt=qwen25-math-cot").prompt)
    assert cot == ("<|im_start|>system\nPlease reason step by step, and put your final answer within "
                   "\\boxed{}.<|im_end|>\n<|im_start|>user\nWhat is $1+1$?<|im_end|>\n<|im_start|>assistant\n")
    plain = render_prompt(qwen_tokenizer, problem, make_config("prompt=plain").prompt)
    assert plain.startswith("<|im_start|>system\nYou are Qwen") and plain.endswith(
        "<|im_start|>user\nWhat is $1+1$?<|im_end|>\n<|im_start|>assistant\n")
    raw = render_prompt(qwen_tokenizer, problem, make_config("prompt=plain", "prompt.use_chat_template=false").prompt)
    assert raw == problem
    # Tokenised, the special tokens are single tokens, as in the real vocabulary.
    ids = qwen_tokenizer(cot, add_special_tokens=False)["input_ids"]
    assert ids.count(qwen_tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3


@pytest.mark.parametrize("experiment,target,prm", [("rsd-paper-7b", "Qwen/Qwen2.5-Math-7B-Instruct", "skywork"),
                                                   ("rsd-paper-72b", "Qwen/Qwen2.5-Math-72B-Instruct", "skywork")])
def test_paper_presets_compose(experiment, target, prm):
    cfg = make_config(f"+experiment={experiment}")
    assert cfg.model.target.path == target and cfg.model.draft.path == "Qwen/Qwen2.5-Math-1.5B-Instruct"
    assert cfg.prm.format == prm and str(cfg.prm.dtype) == "bfloat16"
    assert cfg.method.name.value == "rsd" and cfg.method.threshold == 0.7
    assert cfg.prompt.name == "qwen25-math-cot" and cfg.dataset.name == "math500"
    # The 4096-position trap: prompt + output must stay inside Qwen2.5-Math's context.
    assert cfg.model.target.max_context == 4096 and cfg.method.max_new_tokens <= 3072
    for name in ("qwen25-math-prm-7b", "math-shepherd", "rlhflow-8b", "skywork-7b"):
        assert make_config(f"prm={name}").prm.path


@pytest.fixture()
def real_shapes(tmp_path):
    out = {}
    for role, name in (("draft", "qwen2.5-math-1.5b"), ("target", "qwen2.5-math-7b"), ("prm", "qwen2.5-math-1.5b")):
        folder = tmp_path / role
        folder.mkdir()
        qwen2_config(name).save_pretrained(str(folder))
        out[role] = str(folder)
    return out


def test_memory_plan_of_the_paper_pair(real_shapes):
    cfg = make_config("method=rsd", f"model.draft.path={real_shapes['draft']}",
                      f"model.target.path={real_shapes['target']}", f"prm.path={real_shapes['prm']}",
                      "prm.format=skywork", "model.draft.dtype=bfloat16", "model.target.dtype=bfloat16",
                      "prm.dtype=bfloat16", "method.max_new_tokens=2048")
    plan = {p["role"]: p for p in memory_plan(cfg, ("draft", "target", "prm"), batch_size=64)}
    assert 7.5e9 < plan["target"]["params"] < 7.7e9 and 1.5e9 < plan["draft"]["params"] < 1.6e9
    assert plan["target"]["weights_bytes"] == 2 * plan["target"]["params"]
    # KV per token: 2 (K, V) x 28 layers x 4 KV heads x 128 dims x 2 bytes.
    assert plan["target"]["kv_bytes_per_token"] == 2 * 28 * 4 * 128 * 2
    assert plan["target"]["context"] == 4096
    # 7.6B + 1.5B + 1.5B in bf16 with 64 sequences of 4096 tokens: more than this CPU machine holds.
    with pytest.raises(ModelLoadError, match=r"(?s)memory plan: cpu needs .* GB.*device_map=auto"):
        check_memory(list(plan.values()))
    small = make_config("method=rsd", f"model.target.path={real_shapes['draft']}", "model.target.dtype=bfloat16",
                        "method.max_new_tokens=256")
    table = check_memory(memory_plan(small, ("target",), batch_size=1))
    assert "target" in table and "bfloat16" in table


def test_memory_plan_checks_each_physical_device_once(real_shapes):
    """`cuda` and `cuda:0` are one GPU: their needs add up there; a device_map=auto target is counted,
    spread over every visible GPU (the CPU when there is none); a vLLM target over its TP GPUs."""
    from rsd_batch.models import device_needs, physical_devices

    cfg = make_config("method=rsd", f"model.draft.path={real_shapes['draft']}", f"model.target.path={real_shapes['target']}",
                      f"prm.path={real_shapes['prm']}", "prm.format=skywork", "model.draft.device=cuda",
                      "model.target.device=cuda:0", "prm.device=cuda", "model.draft.dtype=bfloat16",
                      "model.target.dtype=bfloat16", "prm.dtype=bfloat16")
    plan = memory_plan(cfg, ("draft", "target", "prm"), batch_size=8)
    assert {p["role"]: p["devices"] for p in plan} == {"draft": ["cuda:0"], "target": ["cuda:0"], "prm": ["cuda:0"]}
    assert device_needs(plan) == {"cuda:0": sum(p["weights_bytes"] + p["kv_bytes"] for p in plan)}
    auto = make_config(f"model.target.path={real_shapes['target']}", "model.target.device_map=auto")
    assert physical_devices(auto, "target") == ["cpu"]  # no GPU visible here: accelerate puts it on the CPU
    tp = make_config("engine=vllm", "model.target.device=cuda", "launcher.gpus_per_task=4")
    assert physical_devices(tp, "target") == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    split = [{"role": "target", "devices": ["cuda:0", "cuda:1"], "weights_bytes": 10, "kv_bytes": 6},
             {"role": "draft", "devices": ["cuda:1"], "weights_bytes": 3, "kv_bytes": 1}]
    assert device_needs(split) == {"cuda:0": 8, "cuda:1": 12}
