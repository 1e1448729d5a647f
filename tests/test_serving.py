"""Tests for conftok.serving.p_confident_from_logprobs: values worked out by hand, every input form
servers use, the one-token bound, and the errors."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from conftok import p_confident_from_logprobs
from conftok.domains import DEFAULT_DOMAINS, Domain
from conftok.loss import p_confident

ln = math.log


class TestValues:
    def test_both_listed_dict_form(self):
        # 0.6 / (0.6 + 0.2) = 0.75
        top = {"<C_READ>": ln(0.6), "<U_READ>": ln(0.2), "Yes": ln(0.1), "<|im_end|>": ln(0.05)}
        assert p_confident_from_logprobs(top, "read") == pytest.approx(0.75, abs=1e-12)

    def test_openai_list_form_and_client_objects(self):
        # 0.03 / (0.03 + 0.27) = 0.1
        entries = [{"token": "<U_MED>", "logprob": ln(0.27), "bytes": [60]}, {"token": "A", "logprob": ln(0.5)},
                   {"token": "<C_MED>", "logprob": ln(0.03), "bytes": None}]
        assert p_confident_from_logprobs(entries, "med") == pytest.approx(0.1, abs=1e-12)
        objects = [SimpleNamespace(token=e["token"], logprob=e["logprob"], bytes=None) for e in entries]
        assert p_confident_from_logprobs(objects, "med") == pytest.approx(0.1, abs=1e-12)

    def test_tgi_top_tokens_form(self):
        # 0.4 / (0.4 + 0.4) = 0.5
        top = [{"id": 405, "text": "<C_READ>", "logprob": ln(0.4), "special": True},
               {"id": 406, "text": "<U_READ>", "logprob": ln(0.4), "special": True}]
        assert p_confident_from_logprobs(top, "read") == pytest.approx(0.5, abs=1e-12)

    def test_only_the_pair_counts_not_the_rest_of_the_list(self):
        # Other candidates change nothing: the normalising constant cancels.
        a = p_confident_from_logprobs({"<C_READ>": -1.0, "<U_READ>": -3.0}, "read")
        b = p_confident_from_logprobs({"<C_READ>": -1.0, "<U_READ>": -3.0, "No": -0.5, "Yes": -2.0}, "read")
        assert a == b == pytest.approx(1 / (1 + math.exp(-2.0)), abs=1e-12)  # 0.8808

    def test_matches_the_logits_formula(self):
        logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])  # C = 0, U = 2
        logprobs = torch.log_softmax(logits, -1)
        top = {tok: logprobs[i].item() for i, tok in enumerate(["<C_X>", "a", "<U_X>", "b", "c"])}
        assert p_confident_from_logprobs(top, ("<C_X>", "<U_X>")) == pytest.approx(
            p_confident(logits, 0, 2).item(), abs=1e-7)

    def test_domain_forms(self, tmp_path):
        top = {"<C_MED>": ln(0.3), "<U_MED>": ln(0.1)}  # 0.75
        med = DEFAULT_DOMAINS[1]
        for domain in ("med", med, ("<C_MED>", "<U_MED>"), ["<C_MED>", "<U_MED>"]):
            assert p_confident_from_logprobs(top, domain) == pytest.approx(0.75, abs=1e-12)
        # the pair's order matters: confident first
        assert p_confident_from_logprobs(top, ("<U_MED>", "<C_MED>")) == pytest.approx(0.25, abs=1e-12)
        law = Domain("law", ("lawqa",), "<C_LAW>", "<U_LAW>", "multiple_choice")
        top = {"<C_LAW>": ln(0.1), "<U_LAW>": ln(0.4)}  # 0.2
        assert p_confident_from_logprobs(top, "law", domains=[law]) == pytest.approx(0.2, abs=1e-12)
        # An export's (or adapter's) conftok.json, or its directory, as domains=: its other keys are the run's.
        meta = {"domains": [law.to_dict()], "token_ids": {"<C_LAW>": 404, "<U_LAW>": 405}, "dtype": "bf16",
                "adapter": "runs/final", "merged_with": "peft merge_and_unload"}
        (tmp_path / "conftok.json").write_text(json.dumps(meta, indent=2))
        for domains in (tmp_path / "conftok.json", str(tmp_path)):
            assert p_confident_from_logprobs(top, "law", domains=domains) == pytest.approx(0.2, abs=1e-12)
        (tmp_path / "domains.json").write_text(json.dumps({"domains": [law.to_dict()], "dtype": "bf16"}))
        with pytest.raises(ValueError, match="dtype: unknown key"):  # a domain file keeps its one key
            p_confident_from_logprobs(top, "law", domains=tmp_path / "domains.json")

    def test_whitespace_and_duplicates(self):
        # " <C_READ>" and "<C_READ>" are one token here: probabilities add, 0.1 + 0.2 = 0.3; 0.3 / 0.4 = 0.75
        top = [{"token": " <C_READ>", "logprob": ln(0.1)}, {"token": "<C_READ>", "logprob": ln(0.2)},
               {"token": "<U_READ>\n", "logprob": ln(0.1)}]
        assert p_confident_from_logprobs(top, "read") == pytest.approx(0.75, abs=1e-12)

    def test_extreme_values_do_not_overflow(self):
        assert p_confident_from_logprobs({"<C_READ>": 0.0, "<U_READ>": -1000.0}, "read") == 1.0
        assert p_confident_from_logprobs({"<C_READ>": -1000.0, "<U_READ>": 0.0}, "read") == 0.0
        assert p_confident_from_logprobs({"<C_READ>": -math.inf, "<U_READ>": -0.1}, "read") == 0.0
        assert p_confident_from_logprobs({"<C_READ>": -9999.0, "<U_READ>": -9999.0}, "read") == 0.5


class TestOneTokenListed:
    def test_confident_listed_gives_a_lower_bound(self):
        # U is not listed: p(U) <= 0.1 (the smallest listed), so p >= 0.6 / (0.6 + 0.1) = 0.857142...
        top = {"<C_READ>": ln(0.6), "Yes": ln(0.2), "No": ln(0.1)}
        p = p_confident_from_logprobs(top, "read")
        assert p == pytest.approx(6 / 7, abs=1e-12)
        # Any true p(U) below the floor gives a larger p_confident: the value is a lower bound.
        assert all(0.6 / (0.6 + pu) >= p for pu in (0.1, 0.05, 1e-6))

    def test_unconfident_listed_gives_an_upper_bound(self):
        # C is not listed: p(C) <= 0.05, so p <= 0.05 / (0.05 + 0.45) = 0.1
        top = [{"token": "<U_MED>", "logprob": ln(0.45)}, {"token": "B", "logprob": ln(0.3)},
               {"token": "C", "logprob": ln(0.05)}]
        assert p_confident_from_logprobs(top, "med") == pytest.approx(0.1, abs=1e-12)

    def test_a_single_candidate_allows_anything_from_half(self):
        # top_logprobs=1 and it is C: p(U) <= p(C), so all we know is p >= 0.5
        assert p_confident_from_logprobs({"<C_READ>": ln(0.9)}, "read") == pytest.approx(0.5, abs=1e-12)


class TestErrors:
    def test_neither_token_listed(self):
        with pytest.raises(ValueError, match=r"neither <C_READ> nor <U_READ> is among the 2 top") as e:
            p_confident_from_logprobs({"Yes": -0.1, "No": -2.5}, "read")
        assert "'Yes'" in str(e.value) and "skip_special_tokens" not in str(e.value)

    def test_blank_special_tokens_get_a_hint(self):
        with pytest.raises(ValueError, match="skip_special_tokens=False"):
            p_confident_from_logprobs([{"token": "", "logprob": -0.1}, {"token": "", "logprob": -2.0}], "read")

    def test_another_domains_tokens_do_not_count(self):
        with pytest.raises(ValueError, match="neither <C_MED> nor <U_MED>"):
            p_confident_from_logprobs({"<C_READ>": -0.1, "<U_READ>": -2.0}, "med")

    @pytest.mark.parametrize("top, error, match", [
        ({}, ValueError, "empty"),
        ([], ValueError, "empty"),
        ({"<C_READ>": float("nan"), "<U_READ>": -1.0}, ValueError, "must be a number, got nan"),
        ({"<C_READ>": "-0.5"}, ValueError, "must be a number"),
        ({"<C_READ>": 0.7}, ValueError, "above 0"),
        ([{"tok": "<C_READ>", "logprob": -0.1}], ValueError, r"top_logprobs\[0\] needs 'token'"),
        ("<C_READ>", TypeError, "dict token -> logprob"),
        (0.5, TypeError, "dict token -> logprob"),
        ({"<C_READ>": -math.inf, "<U_READ>": -math.inf}, ValueError, "undefined"),
    ])
    def test_bad_lists(self, top, error, match):
        with pytest.raises(error, match=match):
            p_confident_from_logprobs(top, "read")

    @pytest.mark.parametrize("domain, error, match", [
        ("law", KeyError, "unknown domain 'law'"),
        (("<C_READ>",), TypeError, "token pair"),
        (("<C_READ>", "<C_READ>"), ValueError, "must differ"),
        (3, TypeError, "token pair"),
    ])
    def test_bad_domains(self, domain, error, match):
        with pytest.raises(error, match=match):
            p_confident_from_logprobs({"<C_READ>": -0.1, "<U_READ>": -2.0}, domain)
