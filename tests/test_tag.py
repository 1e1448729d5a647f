"""Tagging with Ray Data on a local Ray: the same tagged file and summary as the core's
single-process tagging, and the fail-fast GPU check."""

import json
import shutil
import tempfile

import pytest
import numpy as np
import torch
from conftest import make_model, make_tokenizer, write_jsonl

pytest.importorskip("ray.data")

BOOLQ = [{"question": q, "passage": p, "answer": a} for q, p, a in [
    ("is the barn red", "The barn is red and the river runs north.", True),
    ("is the sky green", "", False),
    ("does the river run north past the old mill", "The river runs north through the valley past the old mill.", True),
    ("is one two three", "one two three four five", "no"),
    ("is the town a city", "The town is small.", "yes"),
    ("code alpha", "", False),
]]
MEDQA = [{"question": q, "options": {"A": "aspirin", "B": "insulin", "C": "penicillin", "D": "heparin"}, "answer": a}
         for q, a in [("The patient has a fever and a cough. Which drug is best?", "C"),
                      ("Which drug lowers blood sugar?", "B"), ("code beta", "A"),
                      ("A patient with a clot needs which drug for the blood, given the red farm?", "D"),
                      ("Which is for pain?", "A")]]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    temp = tempfile.mkdtemp(prefix="/tmp/ctg")  # Ray's socket paths must stay short
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp,
             configure_logging=False, log_to_driver=False)
    yield ray.cluster_resources()
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tag_assets")
    tok = make_tokenizer()
    # Untied and seed 8: with 10 new tokens some answers parse (one right here) and some are trimmed,
    # where a tied random model repeats the prompt's last token ("\n": every response empty).
    # The test needs only the two runs to agree, not these outcomes.
    make_model(len(tok), tie=False, seed=8).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return {"model": str(root / "model"), "root": root,
            "data": {"boolq": write_jsonl(root / "boolq.jsonl", BOOLQ), "medqa": write_jsonl(root / "medqa.jsonl", MEDQA)}}


def tag_in_process(assets, out, *, batch_size, max_new_tokens):
    """The core's tagging, fp32 (bf16 rounding could flip argmax on a random model's flat logits)."""
    from transformers import AutoModelForCausalLM

    from conftok.evaluate import load_rows
    from conftok.modeling import load_tokenizer
    from conftok.tagging import tag_to_file

    tokenizer = load_tokenizer(assets["model"])
    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32).eval()
    rows = {name: load_rows(path) for name, path in assets["data"].items()}
    _, summary = tag_to_file(model, tokenizer, rows, out, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             progress=False)
    return summary


class TestRayDataTagging:
    # batch_size 1: no padding, so generations cannot depend on how Ray Data cuts the 11 rows into
    # batches (8 rows per Ray batch: two batches, one holding both data sets). batch_size 8: each
    # data set is one padded generate() call in both runs (a second actor start: slow).
    @pytest.mark.parametrize("batch_size", [1, pytest.param(8, marks=pytest.mark.slow)])
    def test_same_file_and_summary_as_the_core(self, assets, local_ray, tmp_path, batch_size):
        from ray_jobs.tag import main

        core_summary = tag_in_process(assets, tmp_path / "core.jsonl", batch_size=batch_size, max_new_tokens=10)
        data = [f"{name}={path}" for name, path in assets["data"].items()]
        assert main(["--model_name", assets["model"], "--data", *data, "--out", str(tmp_path / "ray.jsonl"),
                     "--batch_size", str(batch_size), "--max_new_tokens", "10", "--no-bf16", "--num_gpus", "0"]) == 0

        core_lines = (tmp_path / "core.jsonl").read_text().splitlines()
        ray_lines = (tmp_path / "ray.jsonl").read_text().splitlines()
        assert ray_lines == core_lines
        assert (tmp_path / "ray.summary.json").read_text() == (tmp_path / "core.summary.json").read_text()
        assert core_summary["rows"] == len(BOOLQ) + len(MEDQA) and core_summary["tagged"] == len(core_lines) > 0
        datasets = [json.loads(line)["dataset"] for line in ray_lines]
        assert datasets == sorted(datasets)  # --data order: boolq, then medqa

    def test_more_gpus_than_the_cluster_fails_at_once(self, assets, local_ray, tmp_path, capsys):
        from ray_jobs.tag import main

        data = [f"{name}={path}" for name, path in assets["data"].items()]
        assert main(["--model_name", assets["model"], "--data", *data, "--out", str(tmp_path / "x.jsonl"),
                     "--num_gpus", "2"]) == 2
        assert "2 GPU(s) per worker requested, but the cluster has 0" in capsys.readouterr().err
        assert not (tmp_path / "x.jsonl").exists()

    def test_bad_arguments_are_named(self, tmp_path, capsys):
        from ray_jobs.tag import main, parse_args

        assert parse_args(["--model_name", "m", "--data", "boolq=b.jsonl", "--out", "o.jsonl"]).num_gpus is None
        with pytest.raises(SystemExit):
            parse_args(["--model_name", "m", "--data", "boolq=b.jsonl", "--out", "o.jsonl", "--num_gpus", "half"])
        assert "expected 'auto' or a whole number of GPUs, got 'half'" in capsys.readouterr().err
        assert main(["--model_name", "m", "--data", "lawqa=l.jsonl", "--out", str(tmp_path / "o.jsonl")]) == 2
        assert "unknown dataset(s) ['lawqa']" in capsys.readouterr().err  # the single-process tagging's message
        for flag in ("--limit", "--batch_size", "--max_new_tokens"):
            with pytest.raises(SystemExit):
                parse_args(["--model_name", "m", "--data", "boolq=b.jsonl", "--out", "o.jsonl", flag, "0"])
            assert "expected an integer >= 1" in capsys.readouterr().err

    def test_inputs_are_checked_as_the_core_checks_them_before_ray_starts(self, assets, tmp_path, capsys, monkeypatch):
        """A row without its answer, --out naming a directory: exit 2 naming the file, line and field, or the
        path, before Ray starts or the model loads (the Ray job read rows unchecked, tagged the bad row, and
        found the directory only when writing, after all the tagging)."""
        import ray_jobs.common
        from ray_jobs.tag import main

        monkeypatch.setattr(ray_jobs.common, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
        bad = write_jsonl(tmp_path / "bad.jsonl", [BOOLQ[0], {"question": "is it", "passage": "It is."}])
        assert main(["--model_name", assets["model"], "--data", f"boolq={bad}", "--out", str(tmp_path / "o.jsonl")]) == 2
        err = capsys.readouterr().err
        assert f"{bad}:2" in err and "answer" in err and not (tmp_path / "o.jsonl").exists()
        (tmp_path / "outdir").mkdir()
        assert main(["--model_name", assets["model"], "--data", f"boolq={assets['data']['boolq']}",
                     "--out", str(tmp_path / "outdir")]) == 2
        assert "is a directory" in capsys.readouterr().err


def test_the_replicas_generate_the_batches_one_process_would(assets):
    """The driver plans the generate() batches as tag_dataset on one process would (plan_batches over each data set's
    prompt lengths); a replica generates each as it is. In bf16, where the answers depend on the padded batch, the
    outcomes are then the single process's, row for row (cutting the rows in file order gave other batches: 15 of
    256 SmolLM2 answers differed)."""
    from transformers import AutoModelForCausalLM

    from conftok.domains import resolve_domains
    from conftok.evaluate import plan_batches, resolve_batching
    from conftok.modeling import load_tokenizer
    from conftok.prompts import encode_prompt
    from conftok.tagging import tag_dataset
    from ray_jobs.tag import BATCHES_PER_TASK, Tagger, plan_items

    domains = resolve_domains()
    tokenizer = load_tokenizer(assets["model"])
    rows = {"boolq": BOOLQ * 3, "medqa": MEDQA * 2}  # 18 and 10 rows of several lengths
    items = plan_items(rows, tokenizer, domains, batch_size=3, max_new_tokens=6, batching="padding")
    for name, data in rows.items():
        lengths = [len(encode_prompt(tokenizer, domains.for_dataset(name).build_question(r))) for r in data]
        assert [json.loads(i["indices"]) for i in items if i["dataset"] == name] == plan_batches(
            lengths, 3, "padding", decode_steps=6)
    assert len(items) > BATCHES_PER_TASK  # more than one Ray Data batch
    assert resolve_batching("auto", "cpu") == "padding"

    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.bfloat16).eval()
    tagger = Tagger.__new__(Tagger)  # a replica without loading the model again
    tagger.model, tagger.tokenizer, tagger.domains, tagger.batch_size, tagger.max_new_tokens = \
        model, tokenizer, domains, 3, 6
    replica = {}
    for start in range(0, len(items), BATCHES_PER_TASK):  # Ray Data's batches of items
        chunk = items[start:start + BATCHES_PER_TASK]
        out = tagger({key: np.array([item[key] for item in chunk]) for key in ("dataset", "indices", "rows")})
        for name, index, outcome in zip(out["dataset"], out["index"], out["outcome"]):
            replica[(str(name), int(index))] = json.loads(outcome)
    for name, data in rows.items():
        single = tag_dataset(model, tokenizer, name, data, domains=domains, batch_size=3, max_new_tokens=6,
                             progress=False)
        assert [replica[(name, i)] for i in range(len(data))] == single
