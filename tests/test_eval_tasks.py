"""Task files of the four kinds over real photos (scikit-learn's sample images) and the digits corpus:
read in the benchmarks' row formats, prompts rendered, scored; bad input is one TaskError line or a
counted skip."""

import json
import os

import pytest
import sklearn

from megatron_solo.demo.digits import QUESTION
from megatron_solo.errors import InputError
from megatron_solo.eval import tasks as T

PHOTOS = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")  # china.jpg, flower.jpg


def write(path, obj):
    with open(path, "w") as f:
        if path.endswith(".jsonl"):
            f.writelines(json.dumps(r) + "\n" for r in obj)
        elif path.endswith(".yaml"):
            import yaml

            yaml.safe_dump(obj, f)
        else:
            json.dump(obj, f)
    return str(path)


def task_file(tmp_path, desc, rows, name="t.json", data="rows.jsonl"):
    write(str(tmp_path / data), rows)
    return write(str(tmp_path / name), {"data": data, "image_root": PHOTOS, **desc})


def test_the_four_kinds_read_and_score(tmp_path):
    vqa = T.load_task(task_file(tmp_path, {"kind": "open_vqa"}, [  # VQAv2's answers are dicts, TextVQA's strings
        {"question_id": 7, "image": "china.jpg", "question": "What is this?",
         "answers": [{"answer": "temple", "answer_id": i} for i in range(3)] + [{"answer": "building"}] * 7},
        {"image": "flower.jpg", "question": "What color?", "answers": ["pink"] * 10}], name="vqa.yaml"))
    assert vqa.name == "vqa" and vqa.metric == "vqa_accuracy" and len(vqa.samples) == 2
    s = vqa.samples[0]
    assert s.id == "7" and s.image == os.path.join(PHOTOS, "china.jpg")
    assert s.prompt == "What is this?\nAnswer the question using a single word or phrase."
    recs = [T.record(vqa, vqa.samples[0], "A temple."), T.record(vqa, vqa.samples[1], "red")]
    assert recs[0]["predicted"] == "A temple." and recs[0]["score"] == pytest.approx(0.9)
    assert T.summarize(vqa, recs) == pytest.approx({"vqa_accuracy": 0.45})

    mc = T.load_task(task_file(tmp_path, {"kind": "multiple_choice", "prompt": "{question}\n{options}\nLetter:"}, [
        {"index": 0, "image": "china.jpg", "question": "Where?", "A": "a temple", "B": "a beach", "C": None,
         "answer": "A"},  # MMBench: letter columns, the unused ones empty
        {"image": "flower.jpg", "question": "What?", "choices": ["car", "flower", "dog"], "answer": 1}],  # ScienceQA
        name="mc.json"))
    assert mc.samples[0].options == {"A": "a temple", "B": "a beach"}
    assert mc.samples[0].prompt == "Where?\nA. a temple\nB. a beach\nLetter:"
    assert [s.references for s in mc.samples] == [["A"], ["B"]]
    recs = [T.record(mc, mc.samples[0], "A."), T.record(mc, mc.samples[1], "maybe")]
    assert T.summarize(mc, recs) == {"accuracy": 0.5, "unparsed": 1.0}
    ll = T.load_task(task_file(tmp_path, {"kind": "multiple_choice", "metric": "mc_loglikelihood"},
                               [{"image": "flower.jpg", "question": "What?", "choices": ["car", "flower"], "answer": 1}],
                               name="ll.json", data="ll.jsonl"))
    rec = T.record(ll, ll.samples[0], {"A": -4.0, "B": -1.5})
    assert ll.scored_by_loglikelihood and rec["score"] == 1.0
    assert T.summarize(ll, [rec]) == {"accuracy": 1.0, "reference_loglikelihood": -1.5}

    pope = T.load_task(task_file(tmp_path, {"kind": "yes_no"}, [  # POPE's own rows
        {"question_id": 1, "image": "china.jpg", "text": "Is there a dog in the image?", "label": "no"},
        {"question_id": 2, "image": "flower.jpg", "text": "Is there a flower in the image?", "label": "yes"}],
        name="pope.json"))
    recs = [T.record(pope, s, out) for s, out in zip(pope.samples, ["No, there is not.", "Yes"])]
    assert T.summarize(pope, recs) == pytest.approx(
        {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 0.5})


def test_digits_corpus_is_an_exact_match_task(tmp_path, digits_data):
    corpus = os.path.join(digits_data["root"], "corpus")
    task = T.load_task(write(str(tmp_path / "digits.json"), {
        "name": "digits", "kind": "exact_match", "data": os.path.join(corpus, "test.jsonl"), "prompt": QUESTION,
        "limit": 5}))
    with open(os.path.join(corpus, "test.jsonl")) as f:
        rows = [json.loads(line) for line in f][:5]
    assert [s.references for s in task.samples] == [[r["answer"]] for r in rows]
    assert all(s.prompt == QUESTION and os.path.isfile(s.image) for s in task.samples)
    assert T.record(task, task.samples[0], f" {rows[0]['answer']}\n")["score"] == 1.0


def one_line(e):
    msg = str(e.value)
    assert isinstance(e.value, InputError) and "\n" not in msg
    return msg


def test_bad_input_is_one_line_or_a_counted_skip(tmp_path):
    row = {"image": "china.jpg", "question": "Where?", "A": "x", "B": "y", "answer": "A"}
    with pytest.raises(T.TaskError) as e:
        T.load_task(task_file(tmp_path, {"kind": "multiple_choice", "metric": "bleu"}, [row]))
    assert "metric 'bleu' is not one of multiple_choice's metrics (mc_letter, mc_loglikelihood)" in one_line(e)
    with pytest.raises(T.TaskError) as e:
        T.load_task(task_file(tmp_path, {"kind": "multiple_choice"}, [row, {**row, "answer": "E"}]))
    assert "rows.jsonl row 2: answer letter 'E' is not one of the options A, B" in one_line(e)
    with pytest.raises(T.TaskError) as e:
        T.load_task(task_file(tmp_path, {"kind": "captioning"}, [row]))
    assert "kind 'captioning' is not one of open_vqa, multiple_choice, yes_no, exact_match" in one_line(e)
    with pytest.raises(T.TaskError) as e:
        T.load_task(task_file(tmp_path, {"kind": "yes_no"}, [{"image": "china.jpg", "text": "?", "label": "maybe"}]))
    assert "label 'maybe' is not 'yes' or 'no'" in one_line(e)
    with pytest.raises(T.TaskError) as e:
        T.load_task(task_file(tmp_path, {"kind": "open_vqa", "prompt": "{query}"}, [{**row, "answers": ["x"]}]))
    assert "the prompt template names 'query' which the row does not have" in one_line(e)
    with pytest.raises(T.TaskError) as e:
        T.load_task(str(tmp_path / "absent.json"))
    assert "absent.json does not exist" in one_line(e)
    with pytest.raises(T.TaskError) as e:
        T.load_tasks([task_file(tmp_path, {"kind": "multiple_choice"}, [row])] * 2)
    assert "two tasks are named t" in one_line(e)

    task = T.load_task(task_file(tmp_path, {"kind": "multiple_choice"}, [row, {**row, "image": "gone.jpg", "id": "g"}]))
    assert len(task.samples) == 1 and task.skipped == {"image_missing": ["g"]}
