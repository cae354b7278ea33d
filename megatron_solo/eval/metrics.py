"""The benchmarks' metrics, as the benchmarks define them.

- :func:`vqa_accuracy`: VQAv2/TextVQA accuracy. The answer is normalised the way the VQA evaluation
  server (EvalAI) normalises it (lower case, punctuation, articles, number words, contractions:
  :func:`normalize_vqa_answer`), then scored against the ten human answers as min(#matches / 3, 1),
  averaged over the ten subsets of nine answers (the official ``vqaEval.py`` loop). One match scores
  0.3, two 0.6, three 0.9, four or more 1.0.
- :func:`extract_choice`: MMBench's rule-based option extraction (VLMEvalKit's ``can_infer``: an option
  letter standing alone in the answer, else an option's text found in it, and only when exactly one
  option is named). :func:`loglikelihood_choice` picks the option of highest log-likelihood instead (the
  ``loglikelihood`` way of lm-eval/lmms-eval multiple-choice tasks).
- :func:`pope_answer` / :func:`pope_metrics`: POPE's yes/no reading of an answer (its first sentence is
  "no" when it holds the word No/no/not) and its accuracy, precision, recall, F1 and yes-ratio, "yes" being
  the positive class.
- :func:`exact_match`: the stripped, lower-cased answer equals the label (the digits demo).

Nothing here imports torch: the metrics are plain functions of strings and numbers.
"""

from __future__ import annotations

import re

# The VQA evaluation's table of contractions written without apostrophes -> their written form (the
# benchmark's data, as published with its evaluation code; capitalised keys never match after lower-casing,
# which is the official behaviour too).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset(("a", "an", "the"))
# Punctuation the VQA evaluation removes (next to a space, or anywhere when the text holds a digit-comma-
# digit number) or turns into a space (elsewhere); the period is handled apart, so "2.5" keeps its point.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: "(?!<=" is the official pattern (a lookahead, not behind)
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d)(\,)+(?=\d)")


def _vqa_punctuation(text: str) -> str:
    drop_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in PUNCTUATION:
        out = out.replace(p, "" if drop_all or (p + " " in text or " " + p in text) else " ")
    # The official call passes re.UNICODE (32) where the count goes: at most 32 periods are removed.
    return _PERIOD.sub("", out, count=re.UNICODE)


def _vqa_digits_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """The VQA evaluation server's normalisation of an answer (EvalAI's answer processor)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(text))


def vqa_accuracy(prediction: str, references: list[str]) -> float:
    """VQA accuracy of one answer: for each reference left out in turn, min(#other references equal to the
    answer / 3, 1); the mean over the leave-one-out subsets. Answer and references are normalised alike."""
    if not references:
        raise ValueError("a VQA sample needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    refs = [normalize_vqa_answer(r) for r in references]
    scores = []
    for i in range(len(refs)):
        matches = sum(r == pred for j, r in enumerate(refs) if j != i)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


# ---- multiple choice -------------------------------------------------------------------------------

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Answers MMBench's extraction reads as a refusal: option "Z" (none), always wrong.
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
_OPTION_SEPARATORS = ".()[],:;!*#{}"


def _extract_letter(answer: str, letters: list[str]) -> str | None:
    if any(r in answer for r in _REFUSALS):
        return "Z"
    words = answer
    for c in _OPTION_SEPARATORS:
        words = words.replace(c, " ")
    words = words.split()
    named = [c for c in letters if c in words]
    if len(named) == 1:
        return named[0]
    if not named and sum(z in words for z in ("Z", "")) == 1:
        return "Z"
    return None


def _extract_by_text(answer: str, options: dict[str, str]) -> str | None:
    text = answer.lower()
    if len(text) > 2 * sum(len(str(v)) for v in options.values()):
        return None  # a long answer names options in passing: MMBench leaves it to the judge
    named = [k for k, v in options.items() if str(v).lower() in text]
    return named[0] if len(named) == 1 else None


def extract_choice(answer: str, options: dict[str, str]) -> str | None:
    """The option letter an answer names, by MMBench's rules: the letter alone (once, among the options'
    letters; "A." "(B)" "C:" count), else exactly one option's text inside the answer. ``None`` when the
    answer names none or several (MMBench then asks a judge model; here it is wrong). "Z" is a refusal."""
    letter = _extract_letter(answer, list(options))
    return letter if letter is not None else _extract_by_text(answer, options)


def loglikelihood_choice(loglikelihoods: dict[str, float]) -> str:
    """The option of highest log-likelihood (the first of equal ones, in the options' order)."""
    return max(loglikelihoods, key=loglikelihoods.__getitem__)


def check_answer_letter(letter: str, options: dict[str, str]) -> str:
    """The reference letter, upper-cased; a ValueError naming the options when it is not one of them."""
    up = str(letter).strip().upper()
    if up not in options:
        raise ValueError(f"answer letter {letter!r} is not one of the options {', '.join(options)}")
    return up


# ---- POPE --------------------------------------------------------------------------------------------

def pope_answer(text: str) -> str:
    """POPE's reading of a generated answer: only its first sentence, commas removed; "no" when a word of
    it is "No", "no" or "not", else "yes"."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio with "yes" the positive class (POPE's evaluation).
    A ratio with a zero denominator (no "yes" predicted, or no "yes" label) is 0."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    pred = [p == "yes" for p in predictions]
    gold = [g == "yes" for g in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(not p and g for p, g in zip(pred, gold))
    n = len(pred)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(pred) / n if n else 0.0}


# ---- exact match -------------------------------------------------------------------------------------

def exact_match(prediction: str, reference: str) -> bool:
    """The stripped, lower-cased answer equals the stripped, lower-cased reference."""
    return prediction.strip().lower() == reference.strip().lower()
