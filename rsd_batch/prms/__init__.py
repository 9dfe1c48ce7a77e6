"""PRM adapters: one small class per PRM format behind ``score(problems, steps) -> rewards in [0, 1]``.

For the engine's incremental scoring an adapter also gives ``prefix_ids(problem)``,
``step_ids(step, index) -> (ids, reward offset)``, ``backbone`` (the model without its head) and
``rewards_from_hidden(hidden)``. `load_prm` returns it in a `models.LoadedPRM`, with what every role
carries (cost model, device, the engine that runs it).
"""
from __future__ import annotations

import sys

import torch

from .base import PRMAdapter
from .math_shepherd import MathShepherdPRM
from .oracle import OraclePRM
from .qwen_prm import QwenPRM
from .rlhflow import RLHFlowPRM
from .skywork import SkyworkPRM

# To add a format: one small PRMAdapter subclass in this folder, one entry here, one conf/prm/*.yaml.
PRM_ADAPTERS = {"math_shepherd": MathShepherdPRM, "skywork": SkyworkPRM, "qwen_prm": QwenPRM,
                "rlhflow": RLHFlowPRM}

__all__ = ["PRMAdapter", "MathShepherdPRM", "OraclePRM", "SkyworkPRM", "QwenPRM", "RLHFlowPRM", "PRM_ADAPTERS",
           "load_prm"]


def load_prm(cfg):
    """Load the PRM a `PrmConfig` names, ready for the engine."""
    from ..ledger import CostModel
    from ..models import LoadedPRM, ModelLoadError, torch_dtype

    if cfg.format == "oracle":  # the toy checker: no model to load (and no cost), on any engine
        try:
            oracle = OraclePRM.from_pretrained(cfg.path)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
        return LoadedPRM(oracle, CostModel(non_embedding_params=0, n_layers=0, d_attn=0), torch.device("cpu"),
                         backend=sys.modules[OraclePRM.__module__])
    if cfg.format not in PRM_ADAPTERS:
        raise ModelLoadError(f"prm.format={cfg.format!r} is not one of {', '.join(sorted(PRM_ADAPTERS))}, oracle")
    try:
        prm = PRM_ADAPTERS[cfg.format].from_pretrained(cfg.path, device=cfg.device, revision=cfg.revision,
                                                       dtype=torch_dtype(cfg.dtype, cfg.device))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"prm.path={cfg.path!r} could not be loaded: {first}. Give a local folder "
                             "written by save_pretrained, or a hub id on a machine that reaches the hub.") from None
    return LoadedPRM(prm, CostModel.from_model(prm.model), torch.device(cfg.device))
