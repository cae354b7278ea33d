"""The benchmarks' metrics against values worked by hand from each benchmark's own documentation."""

import pytest

from megatron_solo.eval import metrics as M


# VQA (visualqa.org/evaluation.html): "Acc(ans) = min(#humans that said ans / 3, 1)", averaged over all
# 10-choose-9 sets of human answers. With k of 10 references equal to the answer, k of the 10 subsets hold
# k-1 matches and 10-k hold k: k=1 -> 9 x 1/3 / 10 = 0.3; k=2 -> (2 x 1/3 + 8 x 2/3) / 10 = 0.6;
# k=3 -> (3 x 2/3 + 7) / 10 = 0.9; k=4 -> 1.0; k=0 -> 0.
@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_ten_choose_nine(k, expected):
    refs = ["cat"] * k + ["dog"] * (10 - k)
    assert M.vqa_accuracy("cat", refs) == pytest.approx(expected)


# The page's normalisation: lower case, periods removed except as a decimal point, number words to digits,
# articles removed, a missing apostrophe added to a contraction, punctuation to a space (or dropped next to a
# space), a comma inside a number removed.
@pytest.mark.parametrize("raw, normal", [
    ("Two", "2"), ("The dog.", "dog"), ("a red apple", "red apple"), ("dont", "don't"),
    ("2.5", "2.5"), ("100,978", "100978"), ("black/white", "black white"), ("yes!", "yes"),
    ("Ten.", "10"), ("none", "0"), ("it's red", "it 's red"),
])
def test_vqa_answer_normalisation(raw, normal):
    assert M.normalize_vqa_answer(raw) == normal


def test_vqa_accuracy_compares_normalised_answers():
    refs = ["two"] * 3 + ["2 dogs"] * 7
    assert M.vqa_accuracy("2", refs) == pytest.approx(0.9)  # "two" -> "2": three matches
    assert M.vqa_accuracy("Two dogs.", refs) == pytest.approx(1.0)


# MMBench (its paper's "choice extraction"; VLMEvalKit's can_infer): the letter alone, once, in the answer
# ("A." "(B)" "C:" count); else exactly one option's text in the answer; a refusal is "Z"; else nothing.
OPTS = {"A": "red apple", "B": "banana", "C": "cherry", "D": "grape"}


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("(C)", "C"), ("The answer is D.", "D"), ("A: red apple", "A"), ("C:", "C"),
    ("B and C", None), ("banana", "B"), ("It is a cherry", "C"), ("banana or cherry", None),
    ("Cannot determine the answer", "Z"), ("", None), ("e", None),
])
def test_mc_letter_extraction(answer, letter):
    assert M.extract_choice(answer, OPTS) == letter


def test_mc_loglikelihood_choice():
    assert M.loglikelihood_choice({"A": -3.2, "B": -0.7, "C": -5.0}) == "B"
    assert M.loglikelihood_choice({"A": -1.0, "B": -1.0}) == "A"  # ties: the first option


def test_answer_letter_check():
    assert M.check_answer_letter(" b", OPTS) == "B"
    with pytest.raises(ValueError, match="answer letter 'E' is not one of the options A, B, C, D"):
        M.check_answer_letter("E", OPTS)


# POPE (its evaluate.py): only the first sentence counts, commas removed; "no" if a word is No/no/not.
@pytest.mark.parametrize("text, answer", [
    ("Yes", "yes"), ("No", "no"), ("No, there is no dog.", "no"), ("Yes, there is a dog. No other animal.", "yes"),
    ("There is not a dog in the image", "no"), ("yes, no doubt", "no"), ("Not sure", "yes"),
])
def test_pope_answer(text, answer):
    assert M.pope_answer(text) == answer


def test_pope_metrics_hand_worked():
    # labels yes yes yes no no, predictions yes no yes yes no: TP=2 FN=1 FP=1 TN=1
    m = M.pope_metrics(["yes", "no", "yes", "yes", "no"], ["yes", "yes", "yes", "no", "no"])
    assert m == pytest.approx({"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 0.6})
    # all "no": precision/recall/F1 have zero denominators or numerators -> 0, accuracy = share of "no" labels
    m = M.pope_metrics(["no"] * 4, ["yes", "no", "no", "no"])
    assert m == pytest.approx({"accuracy": 0.75, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0})


def test_exact_match():
    assert M.exact_match(" Seven ", "seven") and not M.exact_match("seven.", "seven")
