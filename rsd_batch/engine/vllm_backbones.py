"""vLLM model classes for PRM backbones whose checkpoints carry a head vLLM does not know.

Skywork's `v_head.summary.*` and Qwen2.5-Math-PRM's `score.*` sit beside the Qwen2 backbone's
`model.*` tensors; vLLM's loader refuses tensors it has no parameter for. The PRM runs in vLLM as an
embedding model (the last token's hidden state) and its adapter applies the head itself (prms/), so
these tensors are skipped here: the checkpoint loads as published, with no converted copy.
Imported by vLLM only (registered by name in engine/vllm.py), so importing the project needs no vLLM.
"""
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

HEAD_TENSORS = ("v_head.", "score.")  # read by the adapters from the checkpoint (prms/)


class Qwen2PrmBackbone(Qwen2ForCausalLM):
    def load_weights(self, weights):
        return super().load_weights((name, w) for name, w in weights if not name.startswith(HEAD_TENSORS))
