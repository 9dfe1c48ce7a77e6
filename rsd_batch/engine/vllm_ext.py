"""Classes vLLM loads by name for this project's engines (registered or passed in engine/vllm.py).
Imported by vLLM only, so importing the project needs no vLLM.

- `Qwen2PrmBackbone`: Skywork's `v_head.summary.*` and Qwen2.5-Math-PRM's `score.*` sit beside the
  Qwen2 backbone's `model.*` tensors, and vLLM's loader refuses tensors it has no parameter for. The
  PRM runs in vLLM as an embedding model (the last token's hidden state) and its adapter applies the
  head itself (prms/), so these tensors are skipped: the checkpoint loads as published, no copy made.
- `VocabLimit`: the draft and the target write into one sequence, and their vocabularies can differ
  (Qwen2.5-Math-1.5B: 151,936 rows; 7B/72B: 152,064). Logits of ids past the smaller one are set to
  −inf for every request, so no model samples an id another cannot read.
"""
import torch
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.v1.sample.logits_processor import LogitsProcessor

HEAD_TENSORS = ("v_head.", "score.")  # read by the adapters from the checkpoint (prms/)


class Qwen2PrmBackbone(Qwen2ForCausalLM):
    def load_weights(self, weights):
        return super().load_weights((name, w) for name, w in weights if not name.startswith(HEAD_TENSORS))


class VocabLimit(LogitsProcessor):
    """Masks ids >= the `rsd_vocab_limit` the engine's config carries (hf_overrides in engine/vllm.py)."""

    def __init__(self, vllm_config, device, is_pin_memory) -> None:
        self.limit = getattr(vllm_config.model_config.hf_config, "rsd_vocab_limit", None)

    def is_argmax_invariant(self) -> bool:
        return False  # it can change the argmax: apply it to greedy requests too

    def update_state(self, batch_update) -> None:
        pass  # the same for every request

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.limit is not None and self.limit < logits.shape[-1]:
            logits[:, self.limit:] = float("-inf")
        return logits
