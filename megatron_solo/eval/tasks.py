"""Evaluation tasks: a small JSON or YAML description of a local data file in a benchmark's own format.

A task file names the data (JSONL, or a JSON list), the image root, the prompt template and the metric;
paths are relative to the task file. Four kinds, each reading the rows the benchmark publishes:

=================  ==========================================================  =========================
kind               a row (field names as the benchmark writes them)            metrics
=================  ==========================================================  =========================
``open_vqa``       ``image``, ``question``, ``answers`` (strings, or VQAv2's   ``vqa_accuracy``
                   ``{"answer": ...}`` dicts)
``multiple_choice`` ``image``, ``question``, options as MMBench's ``A``..``Z``  ``mc_letter`` (generate),
                   columns or ScienceQA's ``choices`` list, ``answer`` (a       ``mc_loglikelihood``
                   letter, or ScienceQA's 0-based index)
``yes_no``         POPE's ``image``, ``text`` (or ``question``), ``label``     ``pope``
``exact_match``    ``image``, ``answer`` (the digits corpus' test.jsonl)        ``exact_match``
=================  ==========================================================  =========================

``fields`` renames a row's fields (``{"question": "query"}``). The prompt template is formatted with the
row's fields and, for multiple choice, ``{options}`` (one "A. text" line per option). A mistake in the task
or its data (an unknown kind or metric, a missing file or field, an answer letter that is not an option) is
a :class:`TaskError` (one ``error:`` line); a sample whose image file is missing is skipped and counted
(``Task.skipped``), as the runner counts images it cannot read.

Importing this module imports no torch and changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os

from megatron_solo.errors import InputError
from megatron_solo.eval import metrics as M

KINDS = {  # kind -> (its metrics, the default one, default max_new_tokens)
    "open_vqa": (("vqa_accuracy",), "vqa_accuracy", 16),
    "multiple_choice": (("mc_letter", "mc_loglikelihood"), "mc_letter", 8),
    "yes_no": (("pope",), "pope", 8),
    "exact_match": (("exact_match",), "exact_match", 8),
}
# Metrics that score the options' log-likelihoods (forward passes only) rather than a generated answer.
LOGLIKELIHOOD_METRICS = frozenset(("mc_loglikelihood",))
DEFAULT_PROMPTS = {
    "open_vqa": "{question}\nAnswer the question using a single word or phrase.",
    "multiple_choice": "{question}\n{options}\nAnswer with the option's letter from the given choices directly.",
    "yes_no": "{question}\nAnswer the question using a single word or phrase.",
    "exact_match": "{question}",
}
_TASK_KEYS = {"name", "kind", "data", "image_root", "prompt", "metric", "fields", "max_new_tokens", "limit",
              "prompt_format"}


class TaskError(InputError):
    """A task description or its data file the user must fix."""


@dataclasses.dataclass
class Sample:
    id: str
    image: str  # absolute path
    prompt: str  # the user turn's text (the image comes first in the turn)
    references: list[str] = dataclasses.field(default_factory=list)  # open_vqa; [answer] otherwise
    options: dict[str, str] = dataclasses.field(default_factory=dict)  # multiple_choice: letter -> text


@dataclasses.dataclass
class Task:
    name: str
    kind: str
    metric: str
    path: str  # the task file
    data: str
    image_root: str
    prompt: str
    max_new_tokens: int
    prompt_format: str  # "chat" (the prompt in a user turn) or "pretrain" (the image alone, stage 1)
    samples: list[Sample]
    skipped: dict[str, list[str]]  # reason -> sample ids

    @property
    def scored_by_loglikelihood(self) -> bool:
        return self.metric in LOGLIKELIHOOD_METRICS


def _read_description(path: str) -> dict:
    if not os.path.isfile(path):
        raise TaskError(f"task file {path} does not exist")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml  # only for YAML task files (PyYAML comes with transformers' dependencies)

            desc = yaml.safe_load(text)
        else:
            desc = json.loads(text)
    except Exception as e:  # JSON and YAML parse errors have no common base; the message says where
        raise TaskError(f"task file {path} does not parse: {str(e).splitlines()[0]}") from None
    if not isinstance(desc, dict):
        raise TaskError(f"task file {path} must hold a mapping (kind, data, metric, ...)")
    return desc


def _read_rows(path: str, data: str) -> list[dict]:
    if not os.path.isfile(data):
        raise TaskError(f"task {path}: data file {data} does not exist")
    with open(data) as f:
        if data.endswith(".jsonl"):
            rows = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise TaskError(f"task {path}: {data} line {n} is not JSON ({e.msg})") from None
        else:
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise TaskError(f"task {path}: {data} is not JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise TaskError(f"task {path}: {data} must hold one JSON object per row")
    return rows


def _options(row: dict, where: str) -> dict[str, str]:
    if "choices" in row:  # ScienceQA: a list of option texts
        choices = row["choices"]
        if not isinstance(choices, list) or not choices:
            raise TaskError(f"{where}: 'choices' must be a non-empty list")
        return {M.OPTION_LETTERS[i]: str(c) for i, c in enumerate(choices)}
    opts = {}
    for letter in M.OPTION_LETTERS:  # MMBench: one column per letter, the unused ones empty or absent
        v = row.get(letter)
        if v is None or (isinstance(v, float) and v != v) or str(v).strip() == "":
            break
        opts[letter] = str(v)
    if len(opts) < 2:
        raise TaskError(f"{where}: a multiple-choice row needs options A, B, ... or a 'choices' list")
    return opts


def _answer_letter(answer, options: dict[str, str], where: str) -> str:
    if isinstance(answer, int) and not isinstance(answer, bool):  # ScienceQA: the option's 0-based index
        if not 0 <= answer < len(options):
            raise TaskError(f"{where}: answer index {answer} is not one of the {len(options)} options")
        return M.OPTION_LETTERS[answer]
    try:
        return M.check_answer_letter(answer, options)
    except ValueError as e:
        raise TaskError(f"{where}: {e}") from None


def _references(answers, where: str) -> list[str]:
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers:
        raise TaskError(f"{where}: 'answers' must be a non-empty list of reference answers")
    return [a["answer"] if isinstance(a, dict) and "answer" in a else str(a) for a in answers]


def load_task(path: str) -> Task:
    """Read a task file and its data into samples (images checked to exist; missing ones skipped)."""
    return task_from_description(_read_description(path), path)


def task_from_description(desc: dict, path: str) -> Task:
    """A task from its description; relative paths are relative to ``path``'s directory (``path`` names
    the task in messages: a task file, or the data file of a task built in code like the digits demo's)."""
    unknown = set(desc) - _TASK_KEYS
    if unknown:
        raise TaskError(f"task {path}: unknown key(s) {', '.join(sorted(unknown))} "
                        f"(known: {', '.join(sorted(_TASK_KEYS))})")
    kind = desc.get("kind")
    if kind not in KINDS:
        raise TaskError(f"task {path}: kind {kind!r} is not one of {', '.join(KINDS)}")
    allowed, default_metric, default_tokens = KINDS[kind]
    metric = desc.get("metric", default_metric)
    if metric not in allowed:
        raise TaskError(f"task {path}: metric {metric!r} is not one of {kind}'s metrics ({', '.join(allowed)})")
    if "data" not in desc:
        raise TaskError(f"task {path}: 'data' (the JSONL or JSON file of samples) is missing")
    base = os.path.dirname(os.path.abspath(path))
    data = os.path.join(base, str(desc["data"]))
    image_root = os.path.join(base, str(desc.get("image_root", os.path.dirname(data))))
    prompt = desc.get("prompt", DEFAULT_PROMPTS[kind])
    prompt_format = desc.get("prompt_format", "chat")
    if prompt_format not in ("chat", "pretrain"):
        raise TaskError(f"task {path}: prompt_format {prompt_format!r} is not 'chat' or 'pretrain'")
    fields = {"image": "image", "question": "text" if kind == "yes_no" else "question",
              "answer": "label" if kind == "yes_no" else "answer", "answers": "answers", "id": "question_id"}
    fields.update(desc.get("fields") or {})
    limit = desc.get("limit")
    rows = _read_rows(path, data)
    if limit:
        rows = rows[:int(limit)]

    samples, skipped = [], {}
    for n, row in enumerate(rows):
        where = f"task {path}: {os.path.basename(data)} row {n + 1}"
        sid = str(row.get(fields["id"], row.get("id", n)))
        if fields["image"] not in row:
            raise TaskError(f"{where}: no '{fields['image']}' field")
        image = os.path.join(image_root, str(row[fields["image"]]))
        values = {k: row[v] for k, v in fields.items() if v in row}
        values.update({k: v for k, v in row.items() if k not in values})
        options, refs = {}, []
        if kind == "multiple_choice":
            options = _options(row, where)
            values["options"] = "\n".join(f"{k}. {v}" for k, v in options.items())
            if fields["answer"] not in row:
                raise TaskError(f"{where}: no '{fields['answer']}' field (the answer letter)")
            refs = [_answer_letter(row[fields["answer"]], options, where)]
        elif kind == "open_vqa":
            if fields["answers"] not in row:
                raise TaskError(f"{where}: no '{fields['answers']}' field (the reference answers)")
            refs = _references(row[fields["answers"]], where)
        else:
            if fields["answer"] not in row:
                raise TaskError(f"{where}: no '{fields['answer']}' field")
            refs = [str(row[fields["answer"]]).strip()]
            if kind == "yes_no" and refs[0].lower() not in ("yes", "no"):
                raise TaskError(f"{where}: label {refs[0]!r} is not 'yes' or 'no'")
            refs = [refs[0].lower()] if kind == "yes_no" else refs
        try:
            text = prompt.format(**values)
        except (KeyError, IndexError) as e:
            raise TaskError(f"{where}: the prompt template names {e} which the row does not have") from None
        if not os.path.isfile(image):
            skipped.setdefault("image_missing", []).append(sid)
            continue
        samples.append(Sample(id=sid, image=image, prompt=text, references=refs, options=options))
    return Task(name=str(desc.get("name", os.path.splitext(os.path.basename(path))[0])), kind=kind,
                metric=metric, path=os.path.abspath(path), data=data, image_root=image_root, prompt=prompt,
                max_new_tokens=int(desc.get("max_new_tokens", default_tokens)), prompt_format=prompt_format,
                samples=samples, skipped=skipped)


def load_tasks(paths: str | list[str]) -> list[Task]:
    """``FILE[,FILE]`` (the ``--eval-tasks`` form) or a list of files; two tasks of one name are refused."""
    if isinstance(paths, str):
        paths = [p for p in paths.split(",") if p.strip()]
    tasks = [load_task(p.strip()) for p in paths]
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TaskError(f"two tasks are named {', '.join(dup)}: give one a 'name'")
    return tasks


# ---- scoring -----------------------------------------------------------------------------------------

def parse_prediction(task: Task, sample: Sample, output) -> str | None:
    """The answer a metric compares: the extracted letter (None: none named), POPE's yes/no, or the text.
    ``output`` is the generated text, or for ``mc_loglikelihood`` the options' log-likelihoods."""
    if task.metric == "mc_loglikelihood":
        return M.loglikelihood_choice(output)
    if task.metric == "mc_letter":
        return M.extract_choice(output, sample.options)
    if task.metric == "pope":
        return M.pope_answer(output)
    text = output.strip()
    if task.prompt_format == "pretrain":  # a stage-1 model never learned to stop: its first word
        return text.split()[0].lower() if text.split() else ""
    return text


def score_sample(task: Task, sample: Sample, predicted) -> float:
    if task.metric == "vqa_accuracy":
        return M.vqa_accuracy(predicted, sample.references)
    if task.metric == "exact_match":
        return float(M.exact_match(predicted, sample.references[0]))
    return float(predicted == sample.references[0])  # a letter, or POPE's yes/no


def summarize(task: Task, records: list[dict]) -> dict[str, float]:
    """The task's figures from per-sample records (``predicted``, ``score``, ``reference``)."""
    n = len(records)
    if task.metric == "pope":
        return M.pope_metrics([r["predicted"] for r in records], [r["reference"] for r in records])
    mean = sum(r["score"] for r in records) / n if n else 0.0
    out = {"vqa_accuracy" if task.metric == "vqa_accuracy" else "accuracy": mean}
    if task.metric == "mc_letter":
        out["unparsed"] = float(sum(r["predicted"] is None for r in records))
    if task.metric == "mc_loglikelihood":  # moves before the accuracy does: a smoother signal in training
        out["reference_loglikelihood"] = sum(r["output"][r["reference"]] for r in records) / n if n else 0.0
    return out


def record(task: Task, sample: Sample, output) -> dict:
    """One sample's JSONL record: its id, the raw output, the parsed answer, the reference and the score."""
    predicted = parse_prediction(task, sample, output)
    ref = sample.references if task.kind == "open_vqa" else sample.references[0]
    return {"id": sample.id, "output": output, "predicted": predicted, "reference": ref,
            "score": score_sample(task, sample, predicted)}
