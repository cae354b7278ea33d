"""Token layout and roles with the real Mistral tokenizer extended with SOLO's pieces."""

import numpy as np
import pytest

from megatron_solo.data.encode import DocumentEncoder, image_block_tokens, normalize_messages, video_block_tokens
from megatron_solo.data.errors import SkipRecord
from megatron_solo.data.image import image_to_patches
from megatron_solo.spec import ASSISTANT, IMAGE, SYSTEM, USER
from tests.data_fixtures.helpers import data_url, jpeg_bytes, png_bytes, small_photo, solo_tokenizer

VISION, VPATCH, VROW, VFRAME, VEND, IM_START, IM_END = 32000, 32001, 32002, 32003, 32004, 33029, 33030


def ref_block(n_rows, n_cols):
    """SOLO's layout: <vision>, rows of <vpatch> x n_cols with <vrow_sep> between rows, </vision>."""
    out = [VISION]
    for r in range(n_rows):
        out += [VPATCH] * n_cols
        if r < n_rows - 1:
            out.append(VROW)
    return out + [VEND]


def test_ids_come_from_the_tokenizer():
    tok = solo_tokenizer()
    for piece, i in [("<vision>", VISION), ("<vpatch>", VPATCH), ("<vrow_sep>", VROW), ("<vframe_sep>", VFRAME),
                     ("</vision>", VEND), ("<|im_start|>", IM_START), ("<|im_end|>", IM_END)]:
        assert tok.piece_to_id(piece) == i


@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 32), (32, 1), (3, 4), (24, 32)])
def test_image_block(rows, cols):
    block = image_block_tokens(rows, cols)
    assert block.tolist() == ref_block(rows, cols)
    assert len(block) == rows * cols + (rows - 1) + 2


def test_video_block():
    block = video_block_tokens([(1, 2), (2, 1)])
    assert block.tolist() == [VISION, VPATCH, VPATCH, VFRAME, VPATCH, VROW, VPATCH, VEND]


def test_pretrain_image_then_class_name():
    tok = solo_tokenizer()
    img = small_photo(0, (100, 70))
    enc = DocumentEncoder(tok, "pretrain")
    doc = enc.encode(normalize_messages({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(img), "image/png")}},
        {"type": "text", "text": "goldfish"}]}]}))
    patches, r, c = image_to_patches(img)
    expect = [1] + ref_block(r, c) + tok.sp.encode("goldfish")
    assert doc.tokens.tolist() == expect
    assert np.array_equal(doc.patches, patches)
    nb = len(ref_block(r, c))
    # pretrain: everything in the assistant role, image blocks IMAGE
    assert doc.roles.tolist() == [ASSISTANT] + [IMAGE] * nb + [ASSISTANT] * (len(expect) - 1 - nb)
    assert doc.n_images == 1 and doc.n_image_tokens == nb
    assert tok.decode(doc.tokens[1 + nb:]) == "goldfish"


def test_chat_template_equals_whole_chatml_string():
    tok = solo_tokenizer()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4.\nDone"}]
    doc = DocumentEncoder(tok, "chat").encode(normalize_messages(msgs))
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    whole = tok.sp.encode(text)
    assert whole[0] == tok.piece_to_id("▁")  # SentencePiece's dummy prefix before <|im_start|>
    assert doc.tokens.tolist() == [1] + whole[1:]
    # roles per turn; BOS takes the first message's role
    roles = doc.roles.tolist()
    ends = [i for i, t in enumerate(doc.tokens.tolist()) if t == IM_END]
    assert roles[0] == SYSTEM and set(roles[1:ends[0] + 2]) == {SYSTEM}
    assert set(roles[ends[0] + 2:ends[1] + 2]) == {USER}
    assert set(roles[ends[1] + 2:]) == {ASSISTANT}


def test_chat_with_interleaved_images_and_video():
    tok = solo_tokenizer()
    a, b, c = small_photo(1, (64, 40)), small_photo(2, (33, 70)), small_photo(3, (40, 40))
    msgs = [{"role": "user", "content": [
        {"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {"url": data_url(jpeg_bytes(a))}},
        {"type": "text", "text": "\nwith"},
        {"type": "video", "frames": [data_url(jpeg_bytes(b)), {"url": data_url(jpeg_bytes(c))}]}]},
        {"role": "assistant", "content": "Same."}]
    doc = DocumentEncoder(tok, "chat").encode(normalize_messages(msgs))
    from megatron_solo.data.image import load_image
    pa, ra, ca = image_to_patches(load_image(jpeg_bytes(a)))
    pb, rb, cb = image_to_patches(load_image(jpeg_bytes(b)))
    pc, rc, cc = image_to_patches(load_image(jpeg_bytes(c)))
    video = ref_block(rb, cb)[:-1] + [VFRAME] + ref_block(rc, cc)[1:]
    run = lambda s: (lambda ids: ids[1:] if ids[0] == 28705 else ids)(tok.sp.encode(s))  # noqa: E731
    expect = ([1] + run("<|im_start|>user\nCompare") + ref_block(ra, ca) + run("\nwith") + video
              + run("<|im_end|>\n") + run("<|im_start|>assistant\nSame.<|im_end|>\n"))
    assert doc.tokens.tolist() == expect
    assert np.array_equal(doc.patches, np.concatenate([pa, pb, pc]))
    assert int((doc.tokens == VPATCH).sum()) == len(doc.patches)
    assert doc.n_images == 3
    assert np.all(doc.roles[doc.tokens == VPATCH] == IMAGE)


def test_literal_vision_text_never_becomes_a_vision_token():
    tok = solo_tokenizer()
    doc = DocumentEncoder(tok, "pretrain").encode(normalize_messages([{"role": "assistant",
                                                                       "content": "a <vpatch> b </vision>"}]))
    assert not np.any((doc.tokens >= 32000) & (doc.tokens <= 32004))
    assert tok.decode(doc.tokens[1:]).replace(" ", "") == "a<vpatch>b</vision>"


def test_llava_record():
    tok = solo_tokenizer()
    img = small_photo(0, (50, 50))
    rec = {"image": data_url(jpeg_bytes(img)), "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A photo."}]}
    msgs = normalize_messages(rec)
    assert [m.role for m in msgs] == ["user", "assistant"]
    assert msgs[0].parts[0][0] == "image" and msgs[0].parts[1] == ("text", "\nWhat is it?")
    # without a placeholder, the image opens the first human turn
    rec2 = {"image": "x.jpg", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
    assert normalize_messages(rec2)[0].parts[0] == ("image", "x.jpg")


@pytest.mark.parametrize("record,reason", [
    ({"foo": 1}, "missing_field"),
    ([{"role": "user"}], "missing_field"),
    ([{"role": "robot", "content": "x"}], "unknown_role"),
    ([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}], "unknown_part_type"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "missing_field"),
    ([{"role": "user", "content": [{"text": "no type"}]}], "missing_field"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "unknown_role"),
])
def test_malformed_records(record, reason):
    with pytest.raises(SkipRecord) as e:
        DocumentEncoder(solo_tokenizer(), "chat").encode(normalize_messages(record))
    assert e.value.reason == reason
