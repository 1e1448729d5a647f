import json
import re

import pytest
import torch
from conftest import feature_rows, make_tokenizer, write_jsonl

from conftok.data import IGNORE_INDEX, ConfidenceCollator, ConfidenceDataset, DataError, read_tagged_rows
from conftok.domains import resolve_domains
from conftok.prompts import PLAIN_PROMPT, encode_prompt, render_prompt
from conftok.tokens import add_confidence_tokens

TOKENS = resolve_domains().tokens


@pytest.fixture
def tok():
    t = make_tokenizer()
    add_confidence_tokens(t, None, TOKENS)
    return t


GOOD = {"question": "Is the sky blue?", "tagged_response": "Yes <C_READ>", "dataset": "boolq"}


class TestDataPipeline:
    def test_item_layout(self, tok, tmp_path):
        path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"question": "Which?", "tagged_response": "A: Medication <U_MED>",
                                                         "dataset": "medqa"}])
        ds = ConfidenceDataset(path, tok)
        assert len(ds) == 2
        item = ds[0]
        assert set(item) == {"input_ids", "attention_mask", "labels", "answer_mask"}
        assert item["input_ids"].dtype == torch.long and item["attention_mask"].all()
        prompt = encode_prompt(tok, "Is the sky blue?")
        yes = tok("Yes", add_special_tokens=False)["input_ids"]
        assert item["input_ids"].tolist() == prompt + yes + [tok.convert_tokens_to_ids("<C_READ>")]
        assert (item["labels"][:-1] == IGNORE_INDEX).all()
        assert item["labels"][-1] == tok.convert_tokens_to_ids("<C_READ>")
        assert item["answer_mask"].tolist() == [0] * len(prompt) + [1] * len(yes) + [0]
        assert ds[1]["labels"][-1] == tok.convert_tokens_to_ids("<U_MED>")

    def test_chat_template_turns(self, tok):
        text = render_prompt(tok, "Q?")
        assert text == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"

    def test_plain_fallback_without_chat_template(self, tmp_path):
        plain = make_tokenizer(chat_template=False)
        add_confidence_tokens(plain, None, TOKENS)
        assert render_prompt(plain, "Q?") == PLAIN_PROMPT.format(question="Q?") == "Question: Q?\nAnswer:"
        ds = ConfidenceDataset(write_jsonl(tmp_path / "d.jsonl", [GOOD]), plain)
        ids = ds[0]["input_ids"].tolist()
        text = plain.decode(ids)
        assert text.endswith("Answer: Yes<C_READ>") or text.endswith("Answer: Yes <C_READ>")
        assert ids[0] == plain.bos_token_id

    def test_collator_pads_left_only(self, tok, tmp_path):
        ds = ConfidenceDataset(write_jsonl(tmp_path / "d.jsonl", feature_rows(6, seed=1)), tok)
        items = [ds[i] for i in range(3)]
        batch = ConfidenceCollator(tok.pad_token_id)(items)
        length = max(len(i["input_ids"]) for i in items)
        assert batch["input_ids"].shape == (3, length)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            assert batch["input_ids"][row, length - n:].tolist() == item["input_ids"].tolist()
            assert (batch["input_ids"][row, :length - n] == tok.pad_token_id).all()
            assert batch["attention_mask"][row].tolist() == [0] * (length - n) + [1] * n
            assert batch["labels"][row, -1] == item["labels"][-1]
            assert (batch["labels"][row, :-1] == IGNORE_INDEX).all()

    def test_truncation_cuts_the_question_not_answer_or_token(self, tok, tmp_path):
        long_q = "the river runs north through the valley " * 40 + "Is it long?"
        row = {"question": long_q, "tagged_response": "No <U_READ>", "dataset": "boolq"}
        ds = ConfidenceDataset(write_jsonl(tmp_path / "d.jsonl", [row]), tok, max_seq_length=48)
        ids = ds[0]["input_ids"].tolist()
        assert len(ids) <= 48 and ds.truncated == 1
        no = tok("No", add_special_tokens=False)["input_ids"]
        assert ids[-1] == tok.convert_tokens_to_ids("<U_READ>") and ids[-1 - len(no):-1] == no
        text = tok.decode(ids)
        assert text.startswith("<|im_start|>user\n") and "Is it long?<|im_end|>" in text  # the end of the question stays

    def test_truncation_down_to_no_question(self, tok):
        """At a budget of exactly the empty question's prompt + answer + token the row fits with its question cut
        to nothing; one token less and it does not (the error then names that length as the least allowed)."""
        from conftok.prompts import encode_example

        token = tok.convert_tokens_to_ids("<C_READ>")
        least = sum(map(len, encode_example(tok, "", "Yes", token, 512)[:2])) + 1
        prompt, answer, truncated = encode_example(tok, "Is the sky blue today?", "Yes", token, least)
        assert truncated and prompt == encode_prompt(tok, "") and len(prompt) + len(answer) + 1 == least
        assert encode_example(tok, "Is the sky blue today?", "Yes", token, least - 1) is None

    def test_a_row_that_cannot_fit_is_an_error_naming_its_line(self, tok, tmp_path):
        """Even one row whose answer and token alone exceed max_seq_length stops the run: a silently
        smaller training set is worse than a clear stop."""
        long_answer = {"question": "Q?", "tagged_response": "word " * 60 + "<C_READ>", "dataset": "boolq"}
        path = write_jsonl(tmp_path / "d.jsonl", [GOOD, long_answer, GOOD, long_answer])
        with pytest.raises(DataError) as e:
            ConfidenceDataset(path, tok, max_seq_length=32)
        message = str(e.value)
        assert "2 of 4 rows are longer than max_seq_length=32" in message
        assert "d.jsonl:2: field 'tagged_response'" in message and "d.jsonl:4: field 'tagged_response'" in message
        assert "d.jsonl:1:" not in message and "d.jsonl:3:" not in message
        assert re.search(r"allowed: max_seq_length >= \d+", message)

    def test_all_rows_dropped_is_an_error(self, tok, tmp_path):
        path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Q?", "tagged_response": "w " * 60 + "<C_READ>",
                                                   "dataset": "boolq"}])
        with pytest.raises(DataError, match="all 1 rows are longer than max_seq_length=16"):
            ConfidenceDataset(path, tok, max_seq_length=16)

    @pytest.mark.parametrize("line, problem", [
        ('{"question": "Q", "tagged_response": "Yes <C_READ>", "dataset": "boolq"', "invalid JSON"),
        ('["not", "an", "object"]', "expected a JSON object"),
        ('{"tagged_response": "Yes <C_READ>", "dataset": "boolq"}', "field 'question': missing"),
        ('{"question": "  ", "tagged_response": "Yes <C_READ>", "dataset": "boolq"}', "field 'question': empty"),
        ('{"question": "Q", "tagged_response": 3, "dataset": "boolq"}', "field 'tagged_response': expected a string"),
        ('{"question": "Q", "tagged_response": "Yes <C_READ>", "dataset": "squad"}', "unknown dataset 'squad'"),
        ('{"question": "Q", "tagged_response": "Yes", "dataset": "boolq"}', "no confidence token"),
        ('{"question": "Q", "tagged_response": "Yes <C_LAW>", "dataset": "boolq"}', "unknown token"),
        ('{"question": "Q", "tagged_response": "Yes <C_MED>", "dataset": "boolq"}', "belongs to domain 'med'"),
        ('{"question": "Q", "tagged_response": "Yes <C_READ> <U_READ>", "dataset": "boolq"}', "2 confidence tokens"),
        ('{"question": "Q", "tagged_response": "Yes <C_READ> because", "dataset": "boolq"}', "text after the confidence token"),
        ('{"question": "Q", "tagged_response": "<C_READ>", "dataset": "boolq"}', "no answer before"),
    ])
    def test_bad_row_names_file_line_and_problem(self, tmp_path, line, problem):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n")
        with pytest.raises(DataError) as e:
            read_tagged_rows(path)
        assert f"{path}:3: " in str(e.value)
        assert problem in str(e.value)

    def test_all_bad_rows_reported_together(self, tmp_path):
        path = tmp_path / "bad.jsonl"
        path.write_text("{oops\n" + json.dumps(GOOD) + "\n" + '{"question": "Q", "dataset": "boolq"}\n')
        with pytest.raises(DataError, match=r"2 bad row\(s\)") as e:
            read_tagged_rows(path)
        assert f"{path}:1:" in str(e.value) and f"{path}:3:" in str(e.value)

    def test_missing_and_empty_file(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="nope.jsonl"):
            read_tagged_rows(tmp_path / "nope.jsonl")
        (tmp_path / "empty.jsonl").write_text("\n")
        with pytest.raises(DataError, match="no rows"):
            read_tagged_rows(tmp_path / "empty.jsonl")

    @pytest.mark.parametrize("confident, unconfident", [("<SURE_LAW>", "<UNSURE_LAW>"), ("<c_law>", "<u_law>"),
                                                        ("<C_LAW-2>", "<U_LAW-2>")])
    def test_custom_tokens_of_any_accepted_form(self, tmp_path, confident, unconfident):
        """A domain's tokens need only look like <NAME>; tagged rows with them are read (they were refused as
        "no confidence token" when only <C_X>/<U_X> shapes were looked for)."""
        domains = resolve_domains([*resolve_domains(), {"name": "law", "datasets": ["lawqa"],
                                   "confident_token": confident, "unconfident_token": unconfident,
                                   "task": "multiple_choice"}])
        t = make_tokenizer()
        add_confidence_tokens(t, None, domains.tokens)
        rows = [{"question": "Q", "tagged_response": f"B {unconfident}", "dataset": "lawqa"},
                {"question": "Q", "tagged_response": f"C{confident}", "dataset": "lawqa"}]
        ds = ConfidenceDataset(write_jsonl(tmp_path / "d.jsonl", rows), t, domains=domains)
        assert [int(ds[i]["labels"][-1]) for i in range(2)] == t.convert_tokens_to_ids([unconfident, confident])
        bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q", "tagged_response": f"B {confident} {unconfident}",
                                                    "dataset": "lawqa"}])
        with pytest.raises(DataError, match="2 confidence tokens"):
            read_tagged_rows(bad, domains)

    def test_custom_domain_rows(self, tmp_path):
        domains = resolve_domains([*resolve_domains(), {"name": "law", "datasets": ["lawqa"],
                                   "confident_token": "<C_LAW>", "unconfident_token": "<U_LAW>",
                                   "task": "multiple_choice"}])
        t = make_tokenizer()
        add_confidence_tokens(t, None, domains.tokens)
        path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Q", "tagged_response": "B <U_LAW>", "dataset": "lawqa"}])
        ds = ConfidenceDataset(path, t, domains=domains)
        assert ds[0]["labels"][-1] == t.convert_tokens_to_ids("<U_LAW>")
