"""RSD against target_only on the paper's shapes, on one GPU: tokens/s and share of the bf16 peak per role.

    python benchmarks/bench_gpu.py                      # H200: Qwen2.5-Math-1.5B draft, -7B target,
                                                        # Skywork-1.5B-shaped PRM, bf16, batch 64
    python benchmarks/bench_gpu.py --device cpu --scale 16 --batch 4 --rounds 2 --step-tokens 8 --prompt 16
    python benchmarks/bench_gpu.py --engine vllm        # the same rows on vLLM engines (vLLM's environment)

The models are random-init with the real configurations (rsd_batch/shapes.py): a forward costs the
same whatever the weights. Steps are forced to `--step-tokens` tokens (method.step_tokens) and the
acceptance rate is fixed with ω = constant (0, 0.5, 0.9), so every row measures the real engine,
caches and ledger at a known mix of draft, PRM and target work. Text is token ids written as
numbers (IdTokenizer below), since random models have no real tokenizer to speak through. All three
models share the draft's vocabulary size, so no model can emit an id another cannot embed. With
`--engine vllm` the engines get vLLM's dummy weights from the same configs (no weights are written).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from rsd_batch.config import MethodConfig, MethodName, PromptConfig, Weighting  # noqa: E402
from rsd_batch.ledger import ROLES, CostModel  # noqa: E402
from rsd_batch.methods import Context, Task, get_method  # noqa: E402
from rsd_batch.models import LoadedModel, LoadedPRM  # noqa: E402
from rsd_batch.prms.skywork import HEAD, SkyworkPRM  # noqa: E402
from rsd_batch.shapes import qwen2_config  # noqa: E402


class IdTokenizer:
    """Token ids as text: "17 4 99 " <-> [17, 4, 99]; "\\n\\n" is Qwen's id 271 (Skywork's step token)."""

    chat_template = None
    bos_token = None
    pad_token_id = 0
    eos_token_id = None

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __len__(self) -> int:
        return self.vocab

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [int(t) for t in text.split() if t.isdigit()]
        return ids if ids or "\n" not in text else [271]

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self.encode(text)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(f"{i} " for i in ids)

    def get_vocab(self) -> dict:
        return {"ids": self.vocab}


VOCAB = 151936  # Qwen2.5-Math-1.5B's embedding rows; the 7B's 152,064 include 128 it would never read


def build(name: str, device, scale: int, backbone_only: bool = False):
    from transformers import Qwen2ForCausalLM, Qwen2Model

    cfg = qwen2_config(name, scale, vocab_size=VOCAB)
    with torch.device(device):
        model = (Qwen2Model if backbone_only else Qwen2ForCausalLM)(cfg).to(torch.bfloat16).eval()
    return model, cfg


def build_vllm(args, tok, folder: Path) -> dict:
    """The three roles as vLLM engines with dummy weights, sized by the project's own engine_kwargs."""
    import vllm

    from rsd_batch.config import Config, EngineName
    from rsd_batch.engine import vllm as backend
    from rsd_batch.models import memory_plan

    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # vLLM's pooling runner wants a tokenizer: the same ids-as-numbers one, as a Hugging Face file.
    fast = Tokenizer(tmodels.WordLevel({str(i): i for i in range(VOCAB)}, unk_token="0"))
    fast.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=fast, pad_token="0")
    cfg = OmegaConf.structured(Config)
    shapes = {"draft": "qwen2.5-math-1.5b", "target": "qwen2.5-math-7b", "prm": "qwen2.5-math-1.5b"}
    for role, name in shapes.items():
        conf = qwen2_config(name, args.scale, min_head_dim=32 if args.device == "cpu" else 8, vocab_size=VOCAB,
                            max_position_embeddings=max(1024, args.prompt + args.rounds * args.step_tokens + 64))
        conf.architectures = ["Qwen2ForCausalLM"]
        conf.save_pretrained(str(folder / role))
        hf_tok.save_pretrained(str(folder / role))
        node = cfg.prm if role == "prm" else cfg.model[role]
        node.path, node.dtype, node.device = str(folder / role), "bfloat16", args.device
    cfg.prm.format = "skywork"
    cfg.engine.name = EngineName.vllm
    cfg.engine.enforce_eager = args.device == "cpu"
    if args.device == "cpu":
        cfg.engine.kv_cache_memory_bytes = 256 << 20
    else:
        cfg.engine.gpu_memory_utilization = 0.85
    cfg.run.batch_size = args.batch
    cfg.method.max_new_tokens = args.rounds * args.step_tokens
    plan = memory_plan(cfg, tuple(shapes), args.batch)
    models = {}
    for role in shapes:
        llm = vllm.LLM(**backend.engine_kwargs(cfg, role, plan), load_format="dummy")
        conf = qwen2_config(shapes[role], args.scale, min_head_dim=32 if args.device == "cpu" else 8, vocab_size=VOCAB)
        cost = CostModel.from_config(conf, "AutoModel" if role == "prm" else "AutoModelForCausalLM")
        if role == "prm":
            head = {HEAD[0]: torch.randn(1, conf.hidden_size) * 0.02, HEAD[1]: torch.zeros(1)}
            models[role] = LoadedPRM(SkyworkPRM(None, tok, head, "cpu"), cost, torch.device("cpu"), backend=backend,
                                     engine=llm)
        else:
            models[role] = LoadedModel(role=role, model=llm, tokenizer=tok, cost=cost, device=torch.device("cpu"),
                                       max_context=4096, eos_ids=frozenset(), pad_id=0, backend=backend)
    return models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale", type=int, default=1, help="divide widths/depth (CPU smoke test)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8, help="steps per sample")
    ap.add_argument("--step-tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H200/H100 SXM: 989)")
    ap.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    tok = IdTokenizer(VOCAB)
    if args.engine == "vllm":
        import tempfile
        models = build_vllm(args, tok, Path(tempfile.mkdtemp(prefix="bench_gpu_")))
    else:
        models = build_hf(args, tok, device)
    run_rows(args, models, device)


def build_hf(args, tok, device) -> dict:
    draft_model, dcfg = build("qwen2.5-math-1.5b", device, args.scale)
    target_model, tcfg = build("qwen2.5-math-7b", device, args.scale)
    prm_model, pcfg = build("qwen2.5-math-1.5b", device, args.scale, backbone_only=True)  # Skywork-1.5B shape

    def loaded(role, model):
        return LoadedModel(role=role, model=model, tokenizer=tok, cost=CostModel.from_model(model), device=device,
                           max_context=4096, eos_ids=frozenset({-1}), pad_id=0)  # no EOS: steps are fixed

    draft, target = loaded("draft", draft_model), loaded("target", target_model)
    head = {HEAD[0]: torch.randn(1, pcfg.hidden_size) * 0.02, HEAD[1]: torch.zeros(1)}
    from transformers import Qwen2ForCausalLM
    with torch.device("meta"):
        cost = CostModel.from_model(Qwen2ForCausalLM(pcfg))  # a value head, not an lm_head: close
    prm = LoadedPRM(SkyworkPRM(prm_model, tok, head, device), cost, device)
    return {"draft": draft, "target": target, "prm": prm}


def run_rows(args, models: dict, device) -> None:
    vocab = VOCAB
    rng = random.Random(0)
    tasks = [Task(f"p{i}", 0, " ".join(str(rng.randrange(1000, vocab)) for _ in range(args.prompt)))
             for i in range(args.batch)]
    budget = args.rounds * args.step_tokens
    points = [("target_only", MethodName.target_only, None)] + \
        [(f"rsd, {a:.0%} accepted", MethodName.rsd, a) for a in (0.0, 0.5, 0.9)]
    rows = []
    for label, name, accept in points:
        cfg = OmegaConf.structured(MethodConfig(name=name, temperature=0.0, max_new_tokens=budget,
                                                max_steps=args.rounds, step_tokens=args.step_tokens,
                                                weighting=Weighting.constant, constant=accept or 0.0))
        method = get_method(name.value)
        ctx = Context({r: models[r] for r in method.roles(cfg)}, cfg, OmegaConf.structured(PromptConfig()),
                      0, args.batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        results = [r for _, r in method.run(tasks, ctx)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        per_role = {}
        for role in ROLES:
            flops = sum(r.ledger.role(role).flops for r in results)
            secs = sum(r.ledger.role(role).seconds for r in results)
            toks = sum(r.ledger.role(role).prefill_tokens + r.ledger.role(role).decode_tokens for r in results)
            per_role[role] = (toks, flops, secs)
        out_tokens = sum(r.ledger.draft.generated_tokens - r.ledger.draft.discarded_tokens
                         + r.ledger.target.generated_tokens for r in results)
        accepted = [s.accepted for r in results for s in r.steps if s.accepted is not None]
        rows.append((label, wall, out_tokens, per_role, sum(accepted) / len(accepted) if accepted else None))

    ref_wall = rows[0][1]
    print(f"\n{args.batch} sequences x {args.rounds} steps of {args.step_tokens} tokens after a {args.prompt}-token "
          f"prompt, bf16, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"scale 1/{args.scale}, engine={args.engine}\n")
    print("| method | measured acceptance | wall s | output tok/s | vs target_only | "
          "draft tok/s | draft % peak | target tok/s | target % peak | PRM tok/s | PRM % peak | all TFLOP/s | "
          "% of bf16 peak |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, wall, out_tokens, per_role, acc in rows:
        cells = []
        for role in ROLES:
            toks, flops, secs = per_role[role]
            # a role's FLOPs over its own seconds, as a share of the chip's dense bf16 peak
            cells += [f"{toks / secs:,.0f}" if secs else "-",
                      f"{100 * flops / secs / 1e12 / args.peak_tflops:.1f}" if secs else "-"]
        total = sum(f for _, f, _ in per_role.values())
        print(f"| {label} | {'' if acc is None else f'{acc:.0%}'} | {wall:.2f} | {out_tokens / wall:,.0f} | "
              f"{ref_wall / wall:.2f}x | " + " | ".join(cells) +
              f" | {total / wall / 1e12:.1f} | {100 * total / wall / 1e12 / args.peak_tflops:.1f} |")


if __name__ == "__main__":
    main()
