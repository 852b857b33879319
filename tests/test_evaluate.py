"""Scoring: normalisation, answer extraction from real and adversarial outputs, F1/SubEM, FlashRAG agreement, CLI."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from evaluate import exact_match, extract_answer, f1, normalize_answer, score_file, subem

ROOT = Path(__file__).resolve().parent.parent
EVAL_DIR = ROOT.parent / "shared" / "data" / "searchr1_eval"
EVAL_FILES = sorted(EVAL_DIR.glob("*.jsonl")) if EVAL_DIR.is_dir() else []
needs_data = pytest.mark.skipif(not EVAL_FILES, reason=f"shared data absent: no Search-R1 outputs in {EVAL_DIR}")

# Search-R1's instruction (DESIGN.md), which carries an example answer of its own.
PROMPT = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you get "
    "new information. After reasoning, if you find you lack some knowledge, you can call a search engine by "
    "<search> query </search> and it will return the top searched results between <information> and "
    "</information>. You can search as many times as your want. If you find no further external knowledge "
    "needed, you can directly provide the answer inside <answer> and </answer>, without detailed illustrations. "
    "For example, <answer> Beijing </answer>. Question: what is the capital of france?\n"
)


# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize("raw, expected", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  An apple a day  ", "apple day"),
    ("U.S.A.", "usa"),
    ("Eiffel-Tower!", "eiffeltower"),  # punctuation is dropped, not replaced by a space
    ("anthem of theta", "anthem of theta"),  # articles only as whole words
    ("Paris,\n\tFrance", "paris france"),
    ("Théâtre   du Châtelet", "théâtre du châtelet"),  # non-ASCII letters kept
    ("“Quoted”", "“quoted”"),  # curly quotes are not in string.punctuation (as in SQuAD/FlashRAG)
    ("A", ""),
    ("", ""),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_match():
    assert exact_match("the Eiffel Tower.", ["Eiffel Tower"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert exact_match("1,000", ["1000", "one thousand"]) == 1.0
    assert exact_match("paris", ["Lyon", "PARIS"]) == 1.0
    assert exact_match(None, ["Paris"]) == 0.0
    assert exact_match("Paris", []) == 0.0


def test_exact_match_gold_that_normalises_to_empty():
    # Real golds in NQ/HotpotQA ("*", ")", "The The"). FlashRAG compares "" == "" here, which would reward
    # an empty answer or "the"; we compare lowercased, white-space-collapsed strings instead.
    assert exact_match("", ["*"]) == 0.0
    assert exact_match("the", ["The The"]) == 0.0
    assert exact_match("the  the", ["The The"]) == 1.0
    assert exact_match("*", ["*"]) == 1.0
    assert subem("", ["*"]) == 0.0
    assert subem("*", ["*"]) == 1.0


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize("response, expected", [
    ("<think> easy </think>\n<answer> Paris </answer>", "Paris"),
    ("I don't know.", None),  # no answer at all
    ("", None),
    ("<answer> Saint Mary Magdalene of Pazzi </", None),  # cut off by the token limit (real NQ output)
    ("<answer> Paris", None),  # unclosed
    ("Answer: Jack Till </answer>", None),  # closing tag only (real TriviaQA output)
    # the model repeats the instruction, then answers (79 real outputs): the last answer counts
    ("provide the answer inside <answer> and </answer>.\n<answer> Richard Nixon </answer>", "Richard Nixon"),
    ("<answer> Lyon </answer> wait, no. <answer> Paris </answer>", "Paris"),
    ("<answer>\n  Paris\n</answer>", "Paris"),  # newlines inside the tags
    ("<answer> Spin\nFrequency multiplier In electronics </answer>", "Spin\nFrequency multiplier In electronics"),
    ("<answer></answer>", ""),  # an empty answer is an answer (it scores 0)
    ("<answer> Paris </answer><answer> Rome", "Paris"),  # a later unclosed tag does not count
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_extract_answer_skips_retrieved_text():
    doc = "<information>Doc 1(Title: \"Quiz\") the key reads <answer> Madrid </answer></information>\n\n"
    assert extract_answer("<search> quiz </search>\n\n" + doc) is None
    assert extract_answer("<search> quiz </search>\n\n" + doc + "<answer> Paris </answer>") == "Paris"


def test_prompt_example_is_never_read():
    response = "<think> I need to search. </think>\n<search> capital of france </search>"
    assert extract_answer(response) is None  # only the response is passed
    # what goes wrong when the prompt is passed too: the instruction's example becomes the answer
    assert extract_answer(PROMPT + response) == "Beijing"


# ---------------------------------------------------------------- F1 and SubEM


def test_f1_hand_computed():
    # "eiffel tower in paris" vs "eiffel tower": 2 common tokens, precision 2/4, recall 2/2 -> F1 2/3
    assert f1("The Eiffel Tower in Paris", ["Eiffel Tower"]) == pytest.approx(2 / 3)
    # max over golds: "paris" alone gives precision 1/4, recall 1 -> 0.4 < 2/3
    assert f1("The Eiffel Tower in Paris", ["Paris", "Eiffel Tower"]) == pytest.approx(2 / 3)
    assert f1("Paris", ["Paris", "Eiffel Tower"]) == 1.0
    # repeated tokens count once per match: "new new york" vs "new york" -> common 2, P 2/3, R 1 -> 0.8
    assert f1("new new york", ["New York"]) == pytest.approx(0.8)
    assert f1("Lyon", ["Paris"]) == 0.0
    assert f1(None, ["Paris"]) == 0.0
    assert f1("the", ["a"]) == 0.0  # both normalise to nothing


def test_f1_yes_no_rule():
    assert f1("yes", ["yes, in 1990"]) == 0.0  # yes/no only match themselves (HotpotQA, FlashRAG)
    assert f1("yes in 1990", ["yes"]) == 0.0
    assert f1("Yes.", ["yes"]) == 1.0
    assert f1("no", ["yes"]) == 0.0


def test_subem_hand_computed():
    assert subem("He was born in Paris, France.", ["paris"]) == 1.0
    assert subem("He was born in Paris, France.", ["Lyon", "France"]) == 1.0
    assert subem("Paris", ["Paris, France"]) == 0.0  # gold must be inside the prediction, not the reverse
    assert subem("beatles", ["The Beatles"]) == 1.0
    assert subem(None, ["Paris"]) == 0.0


# ---------------------------------------------------------------- agreement with FlashRAG's scores


@needs_data
@pytest.mark.parametrize("path", EVAL_FILES, ids=[p.name[:40] for p in EVAL_FILES])
def test_reproduces_flashrag_em_and_f1_item_for_item(path):
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    result = score_file(path)
    assert result["n"] == len(rows) > 0
    assert result["em_mismatches"] == []
    assert result["em_agree"] == len(rows)
    assert result["f1_agree"] == len(rows)
    # and FlashRAG's `pred` column is exactly our extraction ("" where the response has no complete answer)
    for row in rows:
        assert (extract_answer(row["final_response"]) or "") == row["pred"], row["id"]


@needs_data
def test_score_cli_on_a_real_file():
    path = EVAL_FILES[0]
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "score", str(path)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith(path.name))
    n, em, f1_, sub, em_agree, f1_agree = line[len(path.name):].split()
    assert int(n) == len(rows)
    assert float(em) == pytest.approx(sum(r["em"] for r in rows) / len(rows), abs=5e-4)
    assert float(f1_) == pytest.approx(sum(r["f1"] for r in rows) / len(rows), abs=5e-4)
    assert float(em) <= float(sub) <= 1.0
    assert em_agree == f1_agree == f"{len(rows)}/{len(rows)}"


def test_score_file_and_cli_errors(tmp_path):
    good = {"final_response": "<answer> Paris </answer>", "golden_answers": ["Paris"]}
    bad = tmp_path / "outputs.jsonl"
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"golden_answers": ["x"]}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:line 2: missing field 'final_response'")):
        score_file(bad)
    bad.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:line 2: bad JSON")):
        score_file(bad)
    out = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "score", str(bad)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and f"{bad}:line 2" in out.stderr


def test_score_file_without_reference_columns(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [
        {"final_response": "<answer> Paris </answer>", "golden_answers": ["Paris"]},
        {"final_response": "<answer> the city of Paris </answer>", "golden_answers": ["Paris"]},
        {"final_response": "<search> x </search>", "golden_answers": ["Paris"]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = score_file(path)
    assert result["n"] == 3 and result["em_agree"] is None and result["f1_agree"] is None
    assert result["em"] == pytest.approx(1 / 3)
    assert result["subem"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx((1 + 2 * (1 / 3) * 1 / (1 / 3 + 1)) / 3)  # "city of paris": P 1/3, R 1
