"""The stored KL reference cache: one base pass for the runs and trials on the same rows and base model."""

import importlib

import pytest
import torch
from conftest import feature_rows, long_answer_rows, make_model, make_tokenizer, write_jsonl

from conftok.config import TrainConfig
from conftok.data import ConfidenceDataset
from conftok.domains import resolve_domains
from conftok.loss import attach_base_topk
from conftok.reference_cache import attach_base_topk_cached, reference_key
from conftok.tokens import add_confidence_tokens

cache_module = importlib.import_module("conftok.reference_cache")
DESCRIPTION = {"model": "tiny", "bf16": False}
K = 8


def _model(tok, device, seed=7):
    model = make_model(len(tok), seed=seed)
    add_confidence_tokens(tok, model, resolve_domains().tokens)
    return model.to(device).eval()


def _dataset(tmp_path, tok, rows=None, name="t.jsonl"):
    return ConfidenceDataset(write_jsonl(tmp_path / name, rows or long_answer_rows()), tok)


def _fresh(ds, model, k=K):
    attach_base_topk(ds, model, k, batch_size=4, progress=False)
    return ds.base_topk


def _assert_same(got, want):
    assert len(got) == len(want)
    for (gi, gl), (wi, wl) in zip(got, want):
        assert torch.equal(gi, wi) and torch.equal(gl, wl)


@pytest.fixture
def counted(monkeypatch):
    """How many rows the base model was run on, over all calls."""
    calls = []
    real = cache_module.rows_base_topk

    def counting(dataset, model, k, rows, **kwargs):
        rows = list(rows)
        calls.append(len(rows))
        return real(dataset, model, k, rows, **kwargs)

    monkeypatch.setattr(cache_module, "rows_base_topk", counting)
    return calls


def test_a_second_run_reuses_the_reference_after_checking_one_batch(tmp_path, device, counted):
    tok = make_tokenizer()
    model = _model(tok, device)
    cache = tmp_path / "cache"
    first = _dataset(tmp_path, tok)
    assert attach_base_topk_cached(first, model, K, cache_dir=cache, model_description=DESCRIPTION,
                                   batch_size=4, progress=False) == "computed"
    assert counted == [len(first)] and len(list(cache.glob("base_topk-*.safetensors"))) == 1
    second = _dataset(tmp_path, tok)  # the next trial: the same rows read again
    assert attach_base_topk_cached(second, model, K, cache_dir=cache, model_description=DESCRIPTION,
                                   batch_size=4, progress=False) == "reused"
    assert counted == [len(first), 4]  # the check: one batch of 4 rows
    _assert_same(second.base_topk, _fresh(_dataset(tmp_path, tok), model))
    assert not list(cache.glob(".*tmp*"))


def test_other_rows_or_another_k_get_their_own_reference(tmp_path, device, counted):
    tok = make_tokenizer()
    model = _model(tok, device)
    cache = tmp_path / "cache"
    for rows, k in ((None, K), (feature_rows(12), K), (None, 4)):
        ds = _dataset(tmp_path, tok, rows, name=f"rows{len(counted)}.jsonl")
        assert attach_base_topk_cached(ds, model, k, cache_dir=cache, model_description=DESCRIPTION,
                                       batch_size=4, progress=False) == "computed"
        _assert_same(ds.base_topk, _fresh(_dataset(tmp_path, tok, rows), model, k))
    assert len(list(cache.glob("base_topk-*.safetensors"))) == 3


def test_other_weights_under_the_same_name_are_caught_and_computed_again(tmp_path, device, capsys):
    tok = make_tokenizer()
    cache = tmp_path / "cache"
    first = _model(tok, device, seed=7)
    attach_base_topk_cached(_dataset(tmp_path, tok), first, K, cache_dir=cache, model_description=DESCRIPTION,
                            batch_size=4, progress=False)
    other = _model(make_tokenizer(), device, seed=8)  # the same description, other weights
    ds = _dataset(tmp_path, tok)
    status = attach_base_topk_cached(ds, other, K, cache_dir=cache, model_description=DESCRIPTION, batch_size=4,
                                     progress=False)
    assert status.startswith("computed (cached copy unusable: top-1 ids agree on")
    _assert_same(ds.base_topk, _fresh(_dataset(tmp_path, tok), other))
    assert attach_base_topk_cached(_dataset(tmp_path, tok), other, K, cache_dir=cache, model_description=DESCRIPTION,
                                   batch_size=4, progress=False) == "reused"  # the file now holds the new one


def test_a_damaged_file_is_computed_again_and_no_cache_writes_nothing(tmp_path, device):
    tok = make_tokenizer()
    model = _model(tok, device)
    cache = tmp_path / "cache"
    attach_base_topk_cached(_dataset(tmp_path, tok), model, K, cache_dir=cache, model_description=DESCRIPTION,
                            batch_size=4, progress=False)
    (path,) = cache.glob("base_topk-*.safetensors")
    path.write_bytes(path.read_bytes()[:100])  # a copy cut short
    ds = _dataset(tmp_path, tok)
    status = attach_base_topk_cached(ds, model, K, cache_dir=cache, model_description=DESCRIPTION, batch_size=4,
                                     progress=False)
    assert status.startswith("computed (cached copy unusable: ")
    _assert_same(ds.base_topk, _fresh(_dataset(tmp_path, tok), model))
    off = tmp_path / "off"
    assert attach_base_topk_cached(_dataset(tmp_path, tok), model, K, cache_dir=None, model_description=DESCRIPTION,
                                   batch_size=4, progress=False) == "computed"
    assert not off.exists()


def test_train_keeps_the_reference_for_the_next_run(tmp_path, device, capsys):
    """Two runs on the same rows and model (a search's trials) share the cache; '' turns it off."""
    from conftok.train import train

    val = {"boolq": [{"question": "is it red", "passage": "It is red.", "answer": True}]}
    path = write_jsonl(tmp_path / "t.jsonl", feature_rows(8))
    cache = tmp_path / "shared"
    outputs = []
    for name, reference_cache in (("a", str(cache)), ("b", str(cache)), ("c", "")):
        tok = make_tokenizer()
        cfg = TrainConfig(model_name="in-process", train_data=path, output_dir=str(tmp_path / name), bf16=False,
                          gradient_checkpointing=False, progress=False, batch_size=4, max_steps=1, max_new_tokens=2,
                          reference_cache=reference_cache)
        assert cfg.stored_kl_weight  # the default guard
        train(cfg, model=make_model(len(tok), seed=0).to(device), tokenizer=tok, val_sets=val)
        outputs.append(capsys.readouterr().out)
    assert "Stored KL reference: computed for 8 rows, kept in " + str(cache) in outputs[0]
    assert "Stored KL reference: reused " + str(cache) in outputs[1]
    assert "Stored KL reference: computed for 8 rows\n" in outputs[2]
    assert not (tmp_path / "c" / "cache").exists()
    assert TrainConfig().reference_cache == "auto"


def test_the_key_holds_the_confidence_ids_and_the_version(tmp_path, monkeypatch):
    # The reference leaves the confidence tokens out (version 2): other tokens, or a version-1 file that still
    # held them, never match.
    tok = make_tokenizer()
    _model(tok, "cpu")
    ds = _dataset(tmp_path, tok)
    assert ds.confidence_ids == sorted(tok.convert_tokens_to_ids(list(resolve_domains().tokens)))
    key = reference_key(ds, DESCRIPTION, K)
    ds.confidence_ids = ds.confidence_ids[:-1]
    assert reference_key(ds, DESCRIPTION, K) != key
    ds.confidence_ids = sorted(tok.convert_tokens_to_ids(list(resolve_domains().tokens)))
    assert reference_key(ds, DESCRIPTION, K) == key
    monkeypatch.setattr(cache_module, "CACHE_VERSION", 1)
    assert reference_key(ds, DESCRIPTION, K) != key


def test_train_computes_the_reference_in_the_precision_its_steps_run(tmp_path, monkeypatch):
    """A float32 model trained under bf16 autocast: the reference is read under the same autocast, so the
    stored KL of the untouched adapter is that of the model against itself (a floor of float32-against-bf16
    rounding otherwise, which the guard would train the adapter to reproduce). The cache keeps it."""
    from conftok.data import ConfidenceCollator
    from conftok.loss import training_loss
    from conftok.train import train

    train_module = importlib.import_module("conftok.train")
    real, seen = train_module.attach_base_topk_cached, []

    def recording(dataset, model, k, **kwargs):
        status = real(dataset, model, k, **kwargs)
        batch = ConfidenceCollator(0)([dataset[i] for i in range(len(dataset))])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the adapter as built (B = 0): the base model
            seen.append(float(training_loss(model, batch, confidence_ids=dataset.confidence_ids,
                                            stored_kl_weight=1.0).kl))
        return status

    monkeypatch.setattr(train_module, "attach_base_topk_cached", recording)
    tok = make_tokenizer()
    model = make_model(len(tok), seed=0)
    with torch.no_grad():  # sharp distributions, where rounding moves the top-k's log-probabilities
        for w in model.parameters():
            w.mul_(8)
    cfg = TrainConfig(model_name="in-process", train_data=write_jsonl(tmp_path / "t.jsonl", feature_rows(8)),
                      output_dir=str(tmp_path / "run"), bf16=True, gradient_checkpointing=False, progress=False,
                      batch_size=4, max_steps=1, max_new_tokens=2, reference_cache=str(tmp_path / "cache"))
    train(cfg, model=model, tokenizer=tok,
          val_sets={"boolq": [{"question": "is it red", "passage": "It is red.", "answer": True}]})
    assert len(list((tmp_path / "cache").glob("base_topk-*.safetensors"))) == 1
    assert seen[0] < 1e-2, seen  # 0.095 with the reference read in float32
