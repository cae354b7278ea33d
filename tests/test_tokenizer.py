"""SOLO's tokenizer against the real Mistral-7B-v0.1 tokenizer shipped in mistral-common."""

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
