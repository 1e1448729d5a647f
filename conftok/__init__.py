"""conftok: teach an instruct LLM to append a per-domain confidence token after every answer.

The core library. It imports neither Ray, unsloth nor bitsandbytes; ``ray_jobs`` wraps it.
"""

from conftok.calibration import auroc, brier_score, calibration_error, reliability_bins
from conftok.config import ConfigError, TrainConfig
from conftok.data import IGNORE_INDEX, ConfidenceCollator, ConfidenceDataset, DataError, read_tagged_rows
from conftok.domains import DEFAULT_DOMAINS, Domain, DomainSet, resolve_domains
from conftok.evaluate import evaluate, load_rows
from conftok.export import export_merged
from conftok.loss import confidence_token_loss, masked_lm_loss, p_confident
from conftok.memory import decide_gradient_checkpointing
from conftok.modeling import build_model, load_adapter, save_adapter
from conftok.predict import Prediction, predict
from conftok.sampler import LengthGroupedBatchSampler, padding_share
from conftok.serving import p_confident_from_logprobs
from conftok.tagging import tag_rows, tag_to_file
from conftok.tokens import add_confidence_tokens
from conftok.train import TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_DOMAINS", "IGNORE_INDEX", "ConfidenceCollator", "ConfidenceDataset", "ConfigError", "DataError",
    "Domain", "DomainSet", "TrainConfig", "TrainResult", "add_confidence_tokens", "auroc", "brier_score",
    "build_model", "calibration_error", "confidence_token_loss", "evaluate", "export_merged", "load_adapter", "load_rows",
    "masked_lm_loss", "p_confident", "p_confident_from_logprobs", "Prediction", "predict", "read_tagged_rows", "reliability_bins", "resolve_domains", "save_adapter",
    "tag_rows", "tag_to_file", "train", "LengthGroupedBatchSampler", "padding_share", "decide_gradient_checkpointing",
]
