"""The nightly evaluation client's pure parts (test/nightly/eval_client.py) on hand-made cases."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "nightly" / "eval_client.py"
_spec = importlib.util.spec_from_file_location("nsa_tp_eval_client", _PATH)
ev = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ev  # dataclasses look their module up while the class is built
_spec.loader.exec_module(ev)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("42", "42"),
        ("1,234", "1234"),
        ("$18", "18"),
        ("3.0", "3"),
        ("2.50", "2.5"),
        ("-7", "-7"),
        ("-0", "0"),
        ("7.", "7"),
        (" 12 ", "12"),
        ("twelve", None),
        ("1e5", None),
        ("", None),
        ("3/4", None),
    ],
)
def test_normalize_number(text, want):
    assert ev.normalize_number(text) == want


def test_gsm8k_reference():
    assert ev.gsm8k_reference("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert ev.gsm8k_reference("... #### 1,000") == "1000"
    with pytest.raises(ValueError, match="no '####'"):
        ev.gsm8k_reference("the answer is 5")
    with pytest.raises(ValueError, match="not a number"):
        ev.gsm8k_reference("#### five")


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("She has 3 apples, then 5 more.\n#### 8", "8"),
        ("Step 1: 2+2=4. Step 2: 4*3=12.\n####  $1,200.00", "1200"),
        ("First 10, then 20.\nThe final answer is \\boxed{30}.", "30"),
        ("So 5 + 6 = 11. The answer is 11 dollars.", "11"),
        ("We get 4, then 9, then finally 16", "16"),  # last number when nothing marks the answer
        ("#### 5 and later text mentions 7", "5"),  # '####' wins over later numbers
        ("No numbers here at all.", None),
        ("answer is: -3.50", "-3.5"),
    ],
)
def test_extract_gsm8k_answer(text, want):
    assert ev.extract_gsm8k_answer(text) == want


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("Reasoning...\nAnswer: C", "C"),
        ("answer: b", "B"),
        ("I first thought Answer: A, but on reflection...\nAnswer: D", "D"),  # the last one counts
        ("**Answer:** (B)", "B"),
        ("Final: \\boxed{A}", "A"),
        ("Final: \\boxed{\\text{D}}", "D"),
        ("The correct option is E. Answer: E", None),  # not a letter of ABCD
        ("I cannot decide.", None),
        ("Answer：C", "C"),  # full-width colon
    ],
)
def test_extract_choice(text, want):
    assert ev.extract_choice(text) == want


def test_gpqa_shuffle_is_seeded_and_tracks_the_correct_letter():
    item = ev.GPQAItem("Q?", "right", ("w1", "w2", "w3"))
    seen = set()
    for seed in range(40):
        choices, letter = ev.gpqa_shuffle(item, seed)
        assert sorted(choices) == list("ABCD") and sorted(choices.values()) == ["right", "w1", "w2", "w3"]
        assert choices[letter] == "right"
        assert ev.gpqa_shuffle(item, seed) == (choices, letter)  # same seed, same order
        seen.add(letter)
    assert seen == set("ABCD")  # the correct answer is not always in one place
    msg = ev.gpqa_messages(item, choices)[0]["content"]
    assert "Q?" in msg and f"{letter}) right" in msg and "Answer: $LETTER" in msg


def test_load_files(tmp_path):
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": f"work\n#### {i * 10}"}) for i in range(3)))
    assert ev.load_gsm8k(str(gsm)) == [("q0", "0"), ("q1", "10"), ("q2", "20")]
    assert ev.load_gsm8k(str(gsm), limit=2) == [("q0", "0"), ("q1", "10")]
    gpqa = tmp_path / "gpqa.csv"
    gpqa.write_text(
        "Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3\n"
        '"What, exactly?", yes ,no,maybe,never\n'
    )
    assert ev.load_gpqa(str(gpqa)) == [ev.GPQAItem("What, exactly?", "yes", ("no", "maybe", "never"))]


def test_accuracy_and_mean():
    assert ev.accuracy(["1", None, "3", "4"], ["1", "2", "3", "5"]) == 0.5
    assert ev.accuracy([None], ["1"]) == 0.0
    with pytest.raises(ValueError, match="expected 2 items"):
        ev.accuracy(["1"], ["1", "2"])
    with pytest.raises(ValueError, match="at least one"):
        ev.accuracy([], [])
    assert ev.mean_of_repeats([0.75, 0.8, 0.85]) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="at least one repeat"):
        ev.mean_of_repeats([])


def test_run_batch_keeps_order():
    assert ev.run_batch(lambda i: f"r{i}", 10, concurrency=4) == [f"r{i}" for i in range(10)]
    assert ev.run_batch(lambda i: "x", 0) == []
