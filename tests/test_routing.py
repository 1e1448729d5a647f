"""Risk-coverage and routing curves, the inference helper, and the evaluation command."""

import json

import pytest
import torch
from conftest import make_model, make_tokenizer, write_jsonl

from conftok.routing import area_under_risk_coverage, risk_coverage_curve, routing_curve

CONF = [0.9, 0.8, 0.3, 0.1]
CORRECT = [1, 1, 0, 1]


class TestRoutingCurves:
    def test_risk_coverage_by_hand(self):
        rc = risk_coverage_curve(CONF, CORRECT)
        assert rc["coverage"] == [0.25, 0.5, 0.75, 1.0]
        assert rc["risk"] == pytest.approx([0.0, 0.0, 1 / 3, 0.25])
        assert area_under_risk_coverage(CONF, CORRECT) == pytest.approx((1 / 3 + 0.25) / 4)

    def test_routing_by_hand(self):
        rt = routing_curve(CONF, CORRECT)
        # routing the 0.1 item (already right) changes nothing; routing the 0.3 item fixes the error
        assert rt["accuracy"] == pytest.approx([0.75, 0.75, 1.0, 1.0, 1.0])
        assert rt["random_accuracy"] == pytest.approx([0.75, 0.8125, 0.875, 0.9375, 1.0])

    def test_ties_give_the_random_expectation(self):
        rt = routing_curve([0.5] * 4, [1, 0, 0, 0])
        assert rt["accuracy"] == pytest.approx(rt["random_accuracy"])
        assert risk_coverage_curve([0.5] * 4, [1, 0, 0, 0])["risk"] == pytest.approx([0.75] * 4)

    def test_perfect_signal_beats_random(self):
        conf, correct = [0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]
        rt = routing_curve(conf, correct)
        assert rt["accuracy"][2] == 1.0 > rt["random_accuracy"][2]
        assert risk_coverage_curve(conf, correct)["risk"][:2] == [0.0, 0.0]

    def test_bad_input(self):
        with pytest.raises(ValueError, match="routing_curve"):
            routing_curve([0.5, 1.5], [1, 0])


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, device):
    from conftok.modeling import build_model, save_adapter

    root = tmp_path_factory.mktemp("adapter")
    tok = make_tokenizer()
    base = make_model(len(tok))
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    model, tok = build_model(str(root / "base"), backend="hf", bf16=False, gradient_checkpointing=False, device=device)
    # As if trained: LoRA and the token rows moved, so C and U differ and p_confident is not 0.5 by construction.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_((torch.randn(p.shape, generator=gen) * 0.3).to(p))
    save_adapter(model, tok, root / "final")
    return root


class TestPredict:
    def test_predict_returns_answer_token_p_and_decision(self, adapter, device):
        from conftok import load_adapter, predict

        model, tok, domains = load_adapter(adapter / "final", device=device)
        row = {"question": "which drug", "options": {"A": "aspirin", "B": "insulin", "C": "heparin", "D": "penicillin"}}
        p = predict(model, tok, row, "medqa", domains=domains, threshold=0.4, max_new_tokens=4)
        assert 0.0 <= p.p_confident <= 1.0 and p.domain == "med"
        assert p.decision == ("answer" if p.p_confident >= 0.4 else "route")
        # The same row through validation (tested against brute force): the med pair, read at the same step.
        from conftok.evaluate import evaluate

        record = evaluate(model, tok, {"medqa": [{**row, "answer": "B"}]}, domains=domains, max_new_tokens=4,
                          progress=False)["records"][0]
        assert abs(p.p_confident - 0.5) > 1e-3
        assert p.p_confident == pytest.approx(record["p_confident"], abs=1e-5)
        assert (p.response, p.token) == (record["response"], record["token"])
        assert p.token in (None, "<C_MED>", "<U_MED>", "<C_READ>", "<U_READ>")
        strict = predict(model, tok, "Is the sky blue?", "boolq", domains=domains, threshold=1.0, max_new_tokens=4)
        assert strict.decision == "route" or strict.p_confident == 1.0
        with pytest.raises(ValueError, match="threshold"):
            predict(model, tok, "Q?", "boolq", threshold=2.0)


class TestEvaluateCommand:
    def test_three_signals_json_and_pngs(self, adapter, tmp_path, capsys):
        pytest.importorskip("matplotlib", reason="the evaluation command draws its curves with matplotlib")
        from ray_jobs.evaluate import METHODS, main

        boolq = write_jsonl(tmp_path / "b.jsonl", [{"id": f"b{i}", "question": "is it red", "passage": "It is red.",
                                                    "answer": i % 2 == 0} for i in range(6)])
        medqa = write_jsonl(tmp_path / "m.jsonl", [{"id": f"m{i}", "question": "which", "answer": "ABCD"[i % 4],
                                                    "options": {"A": "a", "B": "b", "C": "c", "D": "d"}} for i in range(6)])
        code = main(["--adapter", str(adapter / "final"), "--data", f"boolq={boolq}", f"medqa={medqa}",
                     "--calib_beta", "3", "--max_new_tokens", "4", "--no-bf16", "--out", str(tmp_path / "eval")])
        assert code == 0
        result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
        assert set(result["methods"]) == set(METHODS)
        for method in METHODS:
            for domain in ("read", "med"):
                f = result["methods"][method][domain]
                assert f["n"] == 6 and 0 <= f["calibration_error"] <= 1 and 0 <= f["brier"] <= 1
        # an untrained token starts at p = 0.5 exactly (C and U rows equal the end-of-turn row); the trained one not
        from conftok.calibration import brier_score

        for domain in ("read", "med"):
            records = result["records"][domain]
            assert all(r["p_confident"] == pytest.approx(0.5) for r in records["untrained"])
            assert any(abs(r["p_confident"] - 0.5) > 1e-3 for r in records["trained"])
            correct = [r["correct"] for r in records["trained"]]
            methods = {m: result["methods"][m][domain] for m in METHODS}
            assert methods["untrained_token"]["brier"] == pytest.approx(0.25)
            for method, key in (("trained_token", "p_confident"), ("answer_probability", "p_answer")):
                assert methods[method]["brier"] == pytest.approx(
                    brier_score([r[key] for r in records["trained"]], correct)), method
        for domain in ("read", "med"):
            png = tmp_path / "eval" / f"curves_{domain}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        out = capsys.readouterr().out
        assert "trained_token" in out and "answer_probability" in out and "AUROC" in out

    def test_an_unknown_data_set_is_refused_with_what_this_command_can_do(self, adapter, tmp_path, capsys):
        """The adapter's domains decide the data sets: the hint names no flag the command lacks (it suggested
        --domains, which is train's)."""
        from ray_jobs.evaluate import main

        rows = write_jsonl(tmp_path / "b.jsonl", [{"id": "b0", "question": "is it red", "answer": True}])
        assert main(["--adapter", str(adapter / "final"), "--data", f"read={rows}", "--out", str(tmp_path / "e")]) == 2
        err = capsys.readouterr().err
        assert "--data: unknown dataset(s) ['read']; known: ['boolq', 'medqa']" in err
        assert "--domains" not in err and "the adapter's domains are the ones it was trained with" in err
        assert not (tmp_path / "e").exists()
