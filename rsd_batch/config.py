"""Structured configs for every job, registered with Hydra's ConfigStore.

The dataclasses are the schema: `conf/config.yaml` starts from `config_schema`, so a misspelt key, a
wrong type or an unknown enum value fails with Hydra's own error before anything is read or loaded.
This module must not read files or load models.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from .errors import UserError


class Choice(str, Enum):
    """A config enum that reads as its value in interpolations (`runs/${method.name}`)."""

    def __str__(self) -> str:
        return self.value


class LongPrompts(Choice):
    refuse = "refuse"  # before any model loads: name the problems whose prompt does not fit the context
    error_record = "error_record"  # run the rest; those samples are error records (left out of the headline)


class OnBadRow(Choice):
    error = "error"  # stop before writing any shard, naming file, row and field
    skip = "skip"  # write the bad rows to quarantine.jsonl and report how many


class OnDuplicateId(Choice):
    error = "error"
    keep_first = "keep_first"  # later rows with a seen id go to quarantine
    number = "number"  # later rows get "<id>#2", "<id>#3", ...


class AnswerFormat(Choice):
    plain = "plain"  # the field is the answer
    boxed = "boxed"  # the answer is the last \boxed{...} in the field
    gsm8k = "gsm8k"  # the answer follows "####" at the end of a rationale


@dataclass
class FieldsConfig:
    """Which source column holds what. Columns not named here are kept as metadata."""

    problem: str = "problem"
    answer: Optional[str] = "answer"  # null: no gold answer
    id: Optional[str] = None  # null: id = hash of the problem text
    # The reference solution's column, if any (kept in metadata). Only the grading self-check reads
    # it: each reference, graded like a model output, must match its own gold answer.
    solution: Optional[str] = None
    metadata: Optional[list[str]] = None  # null: keep every other column; []: keep none


@dataclass
class DatasetConfig:
    name: str = MISSING
    source: str = MISSING  # a local file, a `datasets` save_to_disk folder, or `hf:<name>`
    format: str = "auto"  # auto | jsonl | json | parquet | csv | arrow | disk | hf
    hf_config: Optional[str] = None
    split: str = "test"
    fields: FieldsConfig = field(default_factory=FieldsConfig)
    answer_format: AnswerFormat = AnswerFormat.plain
    limit: Optional[int] = None  # keep only the first N rows (a pilot)
    on_bad_row: OnBadRow = OnBadRow.error
    on_duplicate_id: OnDuplicateId = OnDuplicateId.error
    num_shards: Optional[int] = None  # null: as many as shard_size needs
    # null: the larger of 250 rows and rows / 1000, i.e. at most 1,000 shards (SLURM's default MaxArraySize
    # is 1001) and never shards so small that loading the models outweighs the work (rsd_batch.shards)
    shard_size: Optional[int] = None


class Dtype(Choice):
    auto = "auto"  # float32 on CPU, bfloat16 on GPU
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@dataclass
class ModelConfig:
    path: str = MISSING  # a local folder or a hub id
    revision: Optional[str] = None
    dtype: Dtype = Dtype.auto
    device: str = "cpu"  # cpu | cuda | cuda:N
    trust_remote_code: bool = False
    max_context: Optional[int] = None  # null: the model config's max_position_embeddings
    device_map: Optional[str] = None  # e.g. "auto": spread a large model over the visible GPUs


class EngineName(Choice):
    hf = "hf"  # this project's own decode loop (per-sequence KV caches): the CPU reference
    vllm = "vllm"  # vLLM's offline LLM engines with prefix caching: the production path


@dataclass
class EngineConfig:
    """Which engine decodes and scores. vLLM's own knobs keep their vLLM names; null: derived."""

    name: EngineName = EngineName.hf
    # vllm: the share of the GPU all three engines may use together, split among the roles in
    # proportion to the memory plan (weights + KV budget). null: size each KV cache in bytes instead.
    gpu_memory_utilization: Optional[float] = None
    # vllm: KV-cache bytes per engine; null: the memory plan's KV budget for that role. On the CPU this
    # (not a memory share) is what works with several engines in one process.
    kv_cache_memory_bytes: Optional[int] = None
    max_model_len: Optional[int] = None  # null: the model's context (model.<role>.max_context)
    enforce_eager: Optional[bool] = None  # true: no CUDA graphs / compilation; null: true on a CPU only
    tensor_parallel_size: Optional[int] = None  # the target's; null: launcher.gpus_per_task
    block_size: Optional[int] = None  # KV block (prefix-cache granularity); null: vLLM's default
    enable_prefix_caching: bool = True


@dataclass
class ModelsConfig:
    draft: ModelConfig = field(default_factory=ModelConfig)
    target: ModelConfig = field(default_factory=ModelConfig)


@dataclass
class PrmConfig:
    format: str = "math_shepherd"  # the adapter in rsd_batch/prms/
    path: str = MISSING
    revision: Optional[str] = None
    dtype: Dtype = Dtype.auto
    device: str = "cpu"
    trust_remote_code: bool = False


@dataclass
class PromptConfig:
    name: str = "plain"
    system: Optional[str] = None  # a system message, when the chat template is used
    template: str = "{problem}"  # the user turn; {problem} is replaced
    use_chat_template: bool = True  # false, or a tokenizer without one: the template text alone


class MethodName(Choice):
    rsd = "rsd"
    target_only = "target_only"
    draft_only = "draft_only"
    sd = "sd"  # token-level speculative sampling (Leviathan et al. 2023, Chen et al. 2023)
    best_of_n = "best_of_n"
    beam_search = "beam_search"


class Aggregation(Choice):
    """How best_of_n / beam_search turn a solution's step rewards into one score."""

    last = "last"
    min = "min"
    prod = "prod"
    mean = "mean"


class Role(Choice):
    draft = "draft"
    target = "target"


class Weighting(Choice):
    """RSD's acceptance weight ω(r) of a draft step with PRM reward r."""

    binary = "binary"  # 1[r >= threshold]  (the paper's default)
    constant = "constant"  # constant
    linear = "linear"  # r
    clipped = "clipped"  # min(1, r / threshold)
    sigmoid = "sigmoid"  # sigmoid((r - threshold) / sigmoid_tau)


@dataclass
class MethodConfig:
    name: MethodName = MethodName.target_only
    n: int = 1  # samples per problem
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 512  # per sample, all steps together
    max_steps: int = 64
    step_delimiter: str = "\n\n"
    step_tokens: int = 0  # > 0: a step is exactly this many tokens, whatever the text (benchmarks)
    refill: bool = True  # continuous batching: a finished sample's slot goes to the next at once
    # RSD
    weighting: Weighting = Weighting.binary
    threshold: float = 0.7  # δ
    constant: float = 0.5
    sigmoid_tau: float = 0.1
    # padded tokens per PRM forward (engine=hf): rows are grouped by length under it, and small groups pad
    # less (the toy world's PRM: 1.65 s at 8192, 1.40 s at 1024 in RSD)
    prm_batch_tokens: int = 1024
    # The target rewrites rejected steps once this share of the samples in flight waits for it (or
    # none can go on without it); 0: every round. Larger: fewer, larger target batches, and more KV
    # held by parked samples (the memory plan counts them). 1.0 ran the toy world's RSD 9% faster than 0.5.
    rewrite_share: float = 1.0
    # A draft row whose step ends before the round's longest goes on to draft its next step meanwhile
    # (engine=hf; vLLM's requests do not wait for each other): kept if the PRM accepts, dropped with its
    # random draws if not, so outputs do not depend on it. Scheduling only.
    draft_ahead: bool = True
    # sd
    speculative_tokens: int = 4  # draft tokens proposed per verification
    # best_of_n, beam_search (search-and-learn's settings)
    policy: Role = Role.target  # the model that writes the candidates
    candidates: int = 4  # N: solutions (best_of_n) or candidates per step (beam_search)
    beam_width: int = 2  # M: each kept beam is expanded M ways; N // M beams are kept
    aggregation: Aggregation = Aggregation.last


# The knobs each method reads beyond the shared ones: a run's fingerprint holds only these, so changing
# another method's knob (method.beam_width for an rsd run) never refuses a resume. rewrite_share,
# draft_ahead and prm_batch_tokens only schedule work (outputs do not depend on them), like the batch size.
SHARED_METHOD_KNOBS = ("name", "n", "temperature", "top_p", "top_k", "max_new_tokens", "max_steps",
                       "step_delimiter", "step_tokens", "refill")
METHOD_KNOBS = {
    "rsd": ("weighting", "threshold", "constant", "sigmoid_tau"),
    "sd": ("speculative_tokens",),
    "best_of_n": ("policy", "candidates", "aggregation"),
    "beam_search": ("policy", "candidates", "beam_width", "aggregation"),
    "target_only": (), "draft_only": (),
}


def method_identity(method: Any) -> dict:
    """The method settings that decide a run's outputs: the shared ones and the chosen method's own."""
    m = to_container(method)
    return {k: m[k] for k in (*SHARED_METHOD_KNOBS, *METHOD_KNOBS[m["name"]])}


class LauncherName(Choice):
    local = "local"  # every shard in this process, one after the other
    debug = "debug"  # in-process too, without any executor around it (for pdb)
    slurm = "slurm"  # one submitit job array over the unfinished shards


@dataclass
class LauncherConfig:
    name: LauncherName = LauncherName.local
    # SLURM (submitit); ignored by local/debug. Cluster presets live in conf/launcher/.
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    gpus_per_task: int = 1
    cpus_per_task: int = 8
    mem_gb: Optional[int] = None
    timeout_min: int = 240
    additional_parameters: dict[str, Any] = field(default_factory=dict)  # extra #SBATCH keys
    setup: list[str] = field(default_factory=list)  # shell lines run first (module load ...)
    array_parallelism: int = 64  # at most this many array tasks at once
    shards_per_task: int = 1  # pack several small shards into one array task
    max_timeouts: int = 3  # requeues after hitting the time limit
    max_preemptions: int = 20  # requeues after a preemption
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: checkpoint and requeue
    folder: Optional[str] = None  # submitit's folder; null: <run.dir>/slurm
    merge_after: bool = False  # also submit the merge as a job that runs afterok
    pilot: Optional[str] = None  # dry run: a merged pilot run folder; its summary.json prices a sample


@dataclass
class RunConfig:
    dir: str = MISSING  # the run folder: manifest, shards, results, logs
    shards_from: Optional[str] = None  # read the manifest from another run folder
    batch_size: int = 16
    seed: int = 0
    fresh: bool = False  # discard results written under another config
    progress: bool = True
    progress_every_s: float = 30.0  # off a terminal (a SLURM log): log the progress line this often
    dry_run: bool = False  # print the plan (shards, samples, estimated cost), submit nothing
    threads: Optional[int] = None  # torch threads of a local run; null: the cores this process may use
    long_prompts: LongPrompts = LongPrompts.refuse  # a prompt longer than the policies' context


class CalibrateGoal(Choice):
    flops = "flops"  # RSD's FLOPs per sample at most `flops_ratio` x target-only's
    acceptance = "acceptance"  # at least `acceptance` of the draft's steps kept


@dataclass
class CalibrateConfig:
    """`rsd-batch calibrate`: bisect δ (method.threshold) on a pilot until the goal is met."""

    goal: CalibrateGoal = CalibrateGoal.flops
    flops_ratio: float = 0.5  # goal=flops: spend at most this share of what the target alone would
    acceptance: float = 0.8  # goal=acceptance: keep at least this share of the draft's steps
    pilot: int = 64  # the first N problems of the dataset
    low: float = 0.0  # the δ interval searched
    high: float = 1.0
    iterations: int = 6  # pilot runs after the two ends: the interval shrinks to (high-low)/2^iterations
    dir: Optional[str] = None  # pilot runs live here; null: <run.dir>/calibrate


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelsConfig = field(default_factory=ModelsConfig)
    prm: PrmConfig = field(default_factory=PrmConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    run: RunConfig = field(default_factory=RunConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)


@dataclass
class ReportConfig:
    """`rsd-batch report <dir>`: every run folder under `dir` is one point of the report."""

    dir: str = MISSING
    out: Optional[str] = None  # where report.md, report.json and frontier.png go; null: dir
    by: Optional[str] = None  # also accuracy per value of this metadata field (e.g. level, subject)


@dataclass
class DoctorConfig:
    """`rsd-batch doctor <run dir>`: verify every file of a run folder; `repair=true` applies the safe repairs."""

    run_dir: str = MISSING
    repair: bool = False  # set aside damaged parts, markers and results (their samples are redone by `run`)


class ExportLayout(Choice):
    sft = "sft"  # chat `messages` (system?, user, assistant) for supervised fine-tuning
    prm = "prm"  # step-labelled: prompt, completions (steps), labels, rewards, sources


@dataclass
class ExportConfig:
    """`rsd-batch export <run dir>`: a merged run as a Hugging Face dataset (Parquet), filtered."""

    run_dir: str = MISSING
    out: Optional[str] = None  # null: <run_dir>/export/<layout>
    layout: ExportLayout = ExportLayout.sft
    split: str = "train"
    correct_only: bool = False  # keep graded-correct samples only
    min_step_reward: Optional[float] = None  # every PRM-scored kept step at least this reward
    min_draft_share: Optional[float] = None  # share of the kept steps written by the draft
    max_draft_share: Optional[float] = None
    finish_reasons: Optional[list[str]] = None  # e.g. [eos]: drop samples cut off by length
    label_threshold: float = 0.5  # prm layout: label = reward >= this (null where unscored)
    fresh: bool = False  # replace an existing export at `out`


ROOT = Path(__file__).resolve().parents[1]  # the checkout: conf/, jobs/, models/, data/


def method_label(method: dict) -> str:
    """What a reader needs to tell two runs apart: the method and its deciding knob (`rsd δ=0.7`)."""
    name = method["name"]
    if name == "rsd":
        w, d = method["weighting"], method["threshold"]
        label = {"binary": f"rsd δ={d:g}", "constant": f"rsd constant p={method['constant']:g}",
                 "sigmoid": f"rsd sigmoid δ={d:g} τ={method['sigmoid_tau']:g}"}.get(w, f"rsd {w} δ={d:g}")
    elif name == "best_of_n":
        label = f"best_of_n N={method['candidates']}"
    elif name == "beam_search":
        label = f"beam_search N={method['candidates']} w={method['beam_width']}"
    elif name == "sd":
        label = f"sd k={method['speculative_tokens']}"
    else:
        label = name
    return label


def method_slug(method: Any) -> str:
    """`method_label` as a folder name (`rsd-d0.7`, `target_only-T0.7`): `run=sweep` names each
    point's run folder with it, so a sweep needs no hand-written run.dir."""
    m = OmegaConf.to_container(method, resolve=True, enum_to_str=True) if not isinstance(method, dict) else method
    slug = method_label(m).replace("δ=", "d").replace("τ=", "t").replace("=", "").replace(" ", "-")
    return slug + (f"-T{m['temperature']:g}" if m.get("temperature") else "")


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(name="report_schema", node=ReportConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="doctor_schema", node=DoctorConfig)
    # `${rsd_root:}` in conf/ points at the checkout, so presets work from any working directory.
    if not OmegaConf.has_resolver("rsd_root"):
        OmegaConf.register_new_resolver("rsd_root", lambda: str(ROOT))
    if not OmegaConf.has_resolver("method_slug"):
        OmegaConf.register_new_resolver("method_slug", method_slug)


class SettingsError(UserError, ValueError):
    """A setting whose value is out of range (the schema checks only its type)."""


# key -> (test, what is allowed). Checked before anything is read, loaded or written.
_RANGES = {
    "dataset.shard_size": (lambda v: v >= 1, "an integer >= 1, or null (the default: rows / 1000, at least 250)"),
    "dataset.num_shards": (lambda v: v >= 1, "an integer >= 1, or null (as many as shard_size needs)"),
    "dataset.limit": (lambda v: v >= 1, "an integer >= 1, or null (every row)"),
    "run.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "method.max_new_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "method.max_steps": (lambda v: v >= 1, "an integer >= 1"),
    "method.n": (lambda v: v >= 1, "an integer >= 1"),
    "method.temperature": (lambda v: v >= 0, ">= 0 (0: greedy)"),
    "method.top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "method.top_k": (lambda v: v >= 0, ">= 0 (0: off)"),
    "method.threshold": (lambda v: v >= 0, ">= 0 (above 1: every draft step is rewritten)"),
    "method.constant": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "method.sigmoid_tau": (lambda v: v > 0, "> 0"),
    "method.rewrite_share": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "method.prm_batch_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "method.speculative_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "method.candidates": (lambda v: v >= 1, "an integer >= 1"),
    "method.beam_width": (lambda v: v >= 1, "an integer >= 1"),
}


def check_settings(cfg: Any) -> None:
    """Refuse a value out of range with one line naming the key and what it takes."""
    from omegaconf import OmegaConf

    for key, (ok, allowed) in _RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and not ok(value):
            raise SettingsError(f"{key}={value}: must be {allowed}")


def to_container(node: Any) -> Any:
    """A plain, JSON-ready copy of a (sub)config with enums as their values."""
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)


register()
