"""SOLO's vocabulary over real Qwen3 and Llama-3.2 tokenizer.json bases through the data pipeline: the real
preprocessing writes ids whose text decodes back, control ids only where the format places them (every
special token of the base typed into the text stays text), the base's document boundaries, and the vocab in
the prefix's stats; where ids meet (a model's tokenizer, a checkpoint, a merge) another base's are refused
with one line, and a prefix made before vocabularies were stored reads as Mistral's."""

import json
import os
import shutil

import numpy as np
import pytest

from megatron_solo.data.dataset import build_sample
from megatron_solo.data.indexed import SoloIndexedDataset, check_prefix
from megatron_solo.data.merge import merge_prefixes
from megatron_solo.data.preprocess import PreprocessConfig, preprocess
from megatron_solo.data.stats import prefix_vocab
from megatron_solo.data.tokenizer import load_tokenizer
from megatron_solo.errors import InputError
from megatron_solo.spec import ASSISTANT, IMAGE, MISTRAL_VOCAB, USER
from tests.data_fixtures.helpers import data_url, jpeg_bytes, small_photo
from tests.test_data_tools import _tool

PLAIN = "A plain document about llamas: 漢字, ünïcödé and 3.14159."


def _corpus(d, tok) -> tuple[str, str, str]:
    """(pretrain JSONL, chat JSONL, the typed text): every control id's piece typed in user text."""
    typed = "typed: " + " ".join(tok.id_to_piece(i) for i in sorted(tok.vocab.control_ids))
    image = {"type": "image_url", "image_url": {"url": data_url(jpeg_bytes(small_photo(0, (70, 40))))}}
    pre, chat = os.path.join(d, "pre.jsonl"), os.path.join(d, "chat.jsonl")
    with open(pre, "w") as f:
        f.write(json.dumps([{"role": "assistant", "content": PLAIN}]) + "\n")
        f.write(json.dumps([{"role": "assistant", "content": [{"type": "text", "text": "Look: "}, image,
                                                              {"type": "text", "text": " " + typed}]}]) + "\n")
    with open(chat, "w") as f:
        f.write(json.dumps([{"role": "user", "content": [image, {"type": "text", "text": typed}]},
                            {"role": "assistant", "content": "It says <|im_end|>."}]) + "\n")
    return pre, chat, typed


def _preprocess(inputs, prefix, tokenizer_model, **kw):
    return preprocess(PreprocessConfig(inputs=[inputs], output_prefix=prefix, tokenizer_model=tokenizer_model,
                                       progress=False, **kw))


@pytest.fixture(scope="module")
def prefixes(hf_tokenizers, solo_tokenizer, tmp_path_factory):
    """{kind: (tokenizer, pretrain prefix, chat prefix, typed text)} for qwen, llama and mistral."""
    out = {}
    for kind, path in (("qwen", hf_tokenizers["solo_qwen"]), ("llama", hf_tokenizers["solo_llama"]),
                       ("mistral", solo_tokenizer)):
        d = str(tmp_path_factory.mktemp(f"vocab_{kind}"))
        tok = load_tokenizer(path)
        pre, chat, typed = _corpus(d, tok)
        _preprocess(pre, os.path.join(d, "pre"), path, fmt="pretrain")
        if kind == "qwen":  # ChatML over a base that has its markers (Llama's are SOLO's appended ones)
            _preprocess(chat, os.path.join(d, "chat"), path, fmt="chat")
        out[kind] = (tok, os.path.join(d, "pre"), os.path.join(d, "chat"), typed)
    return out


@pytest.mark.parametrize("kind", ["qwen", "llama"])
def test_preprocessing_with_a_tokenizer_json_base(prefixes, kind, capsys, tmp_path):
    tok, pre, chat, typed = prefixes[kind]
    v = tok.vocab
    with open(pre + ".stats.json") as f:
        assert json.load(f)["vocab"] == v.to_dict()
    assert prefix_vocab(pre) == v
    ds = SoloIndexedDataset(pre, mmap=False)
    assert ds.vocab == v and len(ds) == 2
    (plain, _, _), = ds.pack(0)
    (shown, roles, patches), = ds.pack(1)
    # the base's document boundaries: Llama opens with BOS; Qwen has none and closes with <|endoftext|>
    if v.bos is None:
        assert plain[-1] == shown[-1] == v.eos and v.eos == tok.piece_to_id("<|endoftext|>")
        plain, body = plain[:-1], shown[:-1]
    else:
        assert plain[0] == shown[0] == v.bos == tok.piece_to_id("<|begin_of_text|>")
        plain, body = plain[1:], shown[1:]
    assert tok.decode(plain) == PLAIN and not v.control_ids.intersection(plain.tolist())
    # the image block in this base's ids, the text around it decodes back; nothing typed became a control id
    start, end = int(np.nonzero(body == v.vision_start)[0][0]), int(np.nonzero(body == v.vision_end)[0][0])
    block = body[start:end + 1]
    n_patch = int((block == v.vision_patch).sum())
    assert n_patch == len(patches) > 0 and set(block[1:-1].tolist()) <= {v.vision_patch, v.vision_row_sep}
    assert tok.decode(body[:start]) == "Look: " and tok.decode(body[end + 1:]) == " " + typed
    assert not v.control_ids.intersection(body[end + 1:].tolist()) and not v.control_ids.intersection(body[:start].tolist())
    # training's sample: loss on text and on the base's document end, never on any other control id
    s = build_sample(ds.pack(1), len(shown) - 1, "assistant", ds.vocab)
    labels, mask = s["labels"].numpy(), s["loss_mask"].numpy() > 0
    assert not np.isin(labels[mask], sorted(v.control_ids - {v.eos})).any()
    assert mask[labels == v.vision_patch].sum() == 0 and int(s["patches"].shape[0]) == n_patch
    if v.bos is None:
        assert mask[-1] and labels[-1] == v.eos  # a Qwen model learns where a document ends
    # tools/visualize_patches.py reads the image block at this base's ids
    assert _tool("visualize_patches").main(["--prefix", pre, "--pack", "1", "--tokenizer-model", tok.model_path,
                                            "--out", str(tmp_path / "v.png")]) == 0
    assert f"Look: [IMAGE ] {typed}" in capsys.readouterr().out
    if kind != "qwen":
        return
    # chat: ChatML's markers at Qwen's own <|im_start|>/<|im_end|> ids, only where placed; no BOS
    assert prefix_vocab(chat) == v and (v.im_start, v.im_end) == (151644, 151645)
    (toks, roles, _), = SoloIndexedDataset(chat, mmap=False).pack(0)
    placed = toks[np.isin(toks, sorted(v.control_ids)) & (roles != IMAGE)].tolist()
    assert placed == [v.im_start, v.im_end] * 2
    assert roles[toks == v.im_end].tolist() == [USER, ASSISTANT]
    text = tok.decode(toks[~np.isin(toks, sorted(v.control_ids)) & (roles != IMAGE)])
    assert text == f"user\n{typed}\nassistant\nIt says <|im_end|>.\n"
    # tools/inspect_data.py's text view reads it with its tokenizer (in this process: no torch start-up)
    inspect = _tool("inspect_data")
    assert inspect.main(["--prefix", chat, "--tokenizer-model", tok.model_path]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("<|im_start|>user\n<image 2x3 closed by </vision>>typed: <|endoftext|> <|im_start|>")
    assert shown.endswith("<|im_start|>[[assistant]][[\\n]]\n[[It]][[ says]][[ <|]][[im]][[_end]][[|]][[>.]]"
                          "[[<|im_end|>]][[\\n]]\n\n")


def test_ids_of_one_base_are_refused_where_they_meet_another(prefixes, hf_tokenizers, solo_tokenizer, tmp_path,
                                                            monkeypatch):
    from dataclasses import asdict

    from megatron_solo.model.config import SoloModelArgs
    from megatron_solo.training import faults
    from megatron_solo.training.arguments import build_parser
    from megatron_solo.training.config import build_train_config

    monkeypatch.setenv("WORLD_SIZE", "1")

    def error(prefix, tokenizer, *extra):
        args = build_parser().parse_args(["--model", "tiny", "--seq-length", "128", "--train-iters", "2",
                                          "--data-path", prefix, "--tokenizer-model", tokenizer, *extra])
        with pytest.raises(InputError) as e:
            faults.check_inputs(build_train_config(args))
        assert "\n" not in str(e.value)
        return str(e.value)

    qwen, mistral = prefixes["qwen"][1], prefixes["mistral"][1]
    assert error(qwen, solo_tokenizer) == (
        f"data prefix {qwen} has SOLO's vocabulary of 152698 ids (<vision>=151669 after a 151669-id base), the model "
        "has 33031 ids (<vision>=32000 after a 32000-id base); preprocess it with the model's tokenizer "
        "(tools/preprocess_data.py --tokenizer-model)")
    # a prefix made before vocabularies were stored reads as Mistral's: accepted by a Mistral model, not by Llama
    legacy = str(tmp_path / "legacy")
    for f in os.listdir(os.path.dirname(mistral)):
        if f.startswith("pre"):
            shutil.copyfile(os.path.join(os.path.dirname(mistral), f), str(tmp_path / f.replace("pre", "legacy", 1)))
    with open(legacy + ".stats.json") as f:
        stats = json.load(f)
    assert stats.pop("vocab") == MISTRAL_VOCAB.to_dict()
    with open(legacy + ".stats.json", "w") as f:
        json.dump(stats, f)
    assert prefix_vocab(legacy) == MISTRAL_VOCAB and SoloIndexedDataset(legacy).vocab == MISTRAL_VOCAB
    args = ["--model", "tiny", "--seq-length", "128", "--train-iters", "2", "--data-path", legacy]
    # the checked vocabulary is the run's (the trainer counts images by it and saves it in every checkpoint)
    assert faults.check_inputs(build_train_config(build_parser().parse_args(
        args + ["--tokenizer-model", solo_tokenizer]))) == MISTRAL_VOCAB
    assert faults.check_inputs(build_train_config(build_parser().parse_args(args))) == MISTRAL_VOCAB  # the model's 33031 ids
    with pytest.raises(InputError, match=f"^data prefix {legacy} has SOLO's vocabulary of 33031 ids "
                                         r"\(<vision>=32000 after a 32000-id base\), the model has 129288 ids"):
        check_prefix(legacy, 129288, prefixes["llama"][0].vocab)
    # a model whose <vpatch> is Mistral's, with Qwen's tokenizer and data: the patches would go nowhere
    assert error(qwen, hf_tokenizers["solo_qwen"]) == (
        "the model takes <vpatch> as id 32001, its tokenizer and checkpoint as 151670 (SOLO's vocabulary of 152698 "
        "ids (<vision>=151669 after a 151669-id base)); build the model for that base (its converted checkpoint, or "
        "the --model preset of its family)")
    # a checkpoint made with Qwen's ids, resumed with Mistral's tokenizer (a complete-looking checkpoint)
    it = tmp_path / "ck" / "iter_0000005"
    it.mkdir(parents=True)
    (it / "metadata.json").write_text("{}")
    (it / "solo_checkpoint.json").write_text(json.dumps({
        "iteration": 5, "model_args": asdict(SoloModelArgs.from_preset("tiny")), "padded_vocab_size": 33152,
        "vocab": prefixes["qwen"][0].vocab.to_dict()}))
    assert error(mistral, solo_tokenizer, "--load", str(tmp_path / "ck")) == (
        f"the checkpoint {it} has SOLO's vocabulary of 152698 ids (<vision>=151669 after a 151669-id base), "
        f"--tokenizer-model {solo_tokenizer} has 33031 ids (<vision>=32000 after a 32000-id base); pass the "
        "tokenizer the checkpoint was made with")
    # a merge of two bases' prefixes
    with pytest.raises(InputError, match="cannot merge prefixes made with different tokenizers: .* has SOLO's "
                                         "vocabulary of 129288 ids"):
        merge_prefixes([mistral, prefixes["llama"][1]], str(tmp_path / "merged"))
    assert not os.path.exists(tmp_path / "merged-tokens.idx")
    assert merge_prefixes([mistral, legacy], str(tmp_path / "m2"))["documents"] == 4  # both Mistral's


def test_images_are_counted_by_the_runs_own_vision_id(prefixes):
    """The throughput line's image count takes the run's ``<vision>`` id (Qwen's 151669, not Mistral's 32000)."""
    import torch

    from megatron_solo.training.sampler import count_images

    qwen = prefixes["qwen"][0].vocab
    tokens = torch.tensor([[qwen.vision_start, qwen.vision_patch, qwen.vision_end, 5, qwen.vision_start]])
    assert count_images([{"tokens": tokens}], qwen.vision_start) == 2
    assert count_images([{"tokens": tokens}], MISTRAL_VOCAB.vision_start) == 0
    assert count_images([{"tokens": tokens}], None) == 0
