"""Check a training run's inputs before a model is loaded, a cluster started or a file written.

:func:`check_train_inputs` reads what ``conftok.train.train`` will read: the domains, every tagged
row, the local validation rows, and the model's tokenizer (no weights), with which it checks that
the confidence tokens are new to the vocabulary and that the rows fit ``max_seq_length``. The Ray
jobs call it on the driver before ``ray.init``: a bad row then costs a second and names its file
and line, where in a worker it would cost a cluster start and a model load, and come back wrapped
in Ray's traceback. Hub validation sources are left to the worker (downloading them here would
load them twice); their rows are checked as they are read there (``conftok.evaluate.load_rows``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from conftok.config import TrainConfig
from conftok.data import ConfidenceDataset, read_tagged_rows
from conftok.domains import DomainSet, resolve_domains
from conftok.inputs import InputError, read_text

__all__ = ["adapter_domains", "check_train_inputs", "check_validation_sources", "is_local_source", "parse_sources"]

logger = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def is_local_source(source: str) -> bool:
    """A validation source read from disk (a ``.jsonl``/``.json``/``.parquet`` path, or any existing path)
    rather than a Hub data set name."""
    return Path(source).suffix in LOCAL_SUFFIXES or Path(source).exists()


def parse_sources(items: list[str], flag: str = "--data") -> dict[str, str]:
    """``["boolq=val/boolq.jsonl", ...]`` -> ``{"boolq": "val/boolq.jsonl"}``; :class:`InputError` for an
    item without ``=`` or a data set named twice."""
    sources: dict[str, str] = {}
    for item in items:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise InputError(f"{flag}: expected DATASET=SOURCE (e.g. boolq=val/boolq.jsonl), got {item!r}")
        if name in sources:
            raise InputError(f"{flag}: data set {name!r} given twice ({sources[name]} and {source}); one source each")
        sources[name] = source
    return sources


def check_validation_sources(sources: dict[str, str], domains: DomainSet, flag: str = "val_sources",
                             split: str = "validation", limit: int | None = None,
                             unknown_hint: str = "add a domain for another data set with --domains FILE"
                             ) -> dict[str, list[dict]]:
    """Check that every data set name is a known domain's and that every local source holds that
    domain's task's rows (:meth:`~conftok.domains.Domain.row_problems`); raise :class:`InputError`
    otherwise (``unknown_hint``: what the caller's user can do about an unknown name). Returns the rows
    read: those of the local sources."""
    from conftok.evaluate import load_rows  # looked up at each call: tests stub it in conftok.evaluate

    unknown = [name for name in sources if name not in domains.dataset_names]
    if unknown:
        raise InputError(f"{flag}: unknown dataset(s) {unknown}; known: {sorted(domains.dataset_names)} "
                         f"({unknown_hint})")
    return {name: load_rows(source, split=split, limit=limit, domain=domains.for_dataset(name))
            for name, source in sources.items() if is_local_source(source)}


def check_train_inputs(cfg: TrainConfig, load_tokenizer: bool = True) -> int:
    """Raise :class:`InputError` (a ``DataError``, ``DomainError``...) naming every problem of the
    run's inputs that can be found without the model's weights.

    Args:
        cfg: the run's configuration (already checked by ``TrainConfig`` itself).
        load_tokenizer: load ``cfg.model_name``'s tokenizer for the token and length checks. Where
            it cannot be loaded here (a Hub id offline), those checks are left to the worker, with a
            log line saying so.

    Returns:
        The number of training rows.
    """
    domains = resolve_domains(cfg.domains)
    tokenizer = None
    if load_tokenizer and Path(cfg.model_name).is_dir():
        tokenizer = _tokenizer_or_none(cfg.model_name)  # a local directory: fast, and nothing to download
    if tokenizer is not None:  # a clashing token explains the rows' problems: first
        domains.check_vocabulary(tokenizer, cfg.model_name)
    n_rows = len(read_tagged_rows(cfg.train_data, domains))
    sources = cfg.val_sources
    if sources is None:
        sources = {d.datasets[0]: d.validation for d in domains if d.validation}
    if not sources:
        raise InputError("val_sources: none given and no domain has a 'validation' source; "
                         "pass --val_sources DATASET=SOURCE ...")
    check_validation_sources(sources, domains, "val_sources", cfg.val_split, cfg.val_max_samples)
    if load_tokenizer and not Path(cfg.model_name).is_dir():
        tokenizer = _tokenizer_or_none(cfg.model_name)  # a Hub id: a download, after the cheap checks
        if tokenizer is not None:
            domains.check_vocabulary(tokenizer, cfg.model_name)
    if tokenizer is not None:
        from conftok.tokens import add_confidence_tokens

        add_confidence_tokens(tokenizer, None, domains.tokens)
        ConfidenceDataset(cfg.train_data, tokenizer, cfg.max_seq_length, domains=domains)
    return n_rows


def _tokenizer_or_none(model_name: str):
    from conftok.modeling import load_tokenizer

    try:
        return load_tokenizer(model_name)
    except Exception as e:  # noqa: BLE001 - offline Hub id, missing tokenizer package...: the worker checks instead
        logger.warning("no tokenizer for %s here (%s: %s): the token and length checks run in the worker",
                       model_name, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None

def adapter_domains(adapter: str) -> DomainSet | None:
    """The domains a saved adapter was trained with (its ``conftok.json``), read without loading
    anything else; None for a Hub repo id (``user/name`` that is not a local path)."""
    from conftok.modeling import METADATA_FILE, looks_like_hub_id

    path = Path(adapter)
    if not path.exists():
        if looks_like_hub_id(adapter):
            return None
        raise InputError(f"--adapter {adapter}: no such directory; expected an adapter directory written by "
                         "training (final/, best_calibration/, checkpoint-N/) or a Hub repo id user/name")
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise InputError(f"--adapter {adapter}: not a conftok adapter (no {METADATA_FILE}); expected a directory "
                         "written by training (final/, best_calibration/, checkpoint-N/)")
    try:
        meta = json.loads(read_text(meta_path, "adapter metadata file"))
    except json.JSONDecodeError as e:
        raise InputError(f"{meta_path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(meta, dict) or "domains" not in meta:
        raise InputError(f"{meta_path}: no 'domains' list; the adapter's metadata is incomplete")
    return resolve_domains(meta["domains"])
