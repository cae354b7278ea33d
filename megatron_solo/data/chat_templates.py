"""Chat templates (``--chat-template``) as rows of data; :class:`~megatron_solo.data.encode.DocumentEncoder`
lays a document out by its template's row. docs/DATA_FORMAT.md shows each layout.

Two layouts read the rows:

``turns``  every message in place between its template's turn markers: ``turn_open`` and
           ``turn_close`` are sequences of control tokens (:class:`Control`, a field name of
           :class:`~megatron_solo.spec.SoloVocab`) and text (``{role}`` is the message's role);
           images and ``loc`` parts stand where they are in the text. ChatML is a row; Qwen's ChatML
           is the same row with ``bos=False``; Llama-3's (``llama3``) opens a turn with the base's own
           ``<|start_header_id|>{role}<|end_header_id|>\\n\\n`` and closes it with its ``<|eot_id|>``
           (SoloVocab's ``start_header``, ``end_header``, ``eot``: only a base that has them can use it).
           Pre-training (``--format pretrain``) is this layout without markers, every text part
           trained as the assistant's (:data:`PRETRAIN`).
``inst``   Mistral's instruction layout as SOLO's released tuning fed SOLO-7B: every image block first
           (each closed with ``image_close``), then BOS, ``user_turn`` around each user text (plain
           text pieces), assistant text followed by ``answer_end``.

``stop`` names the token that ends an answer (what generation stops at, and a trained stop token of
:func:`megatron_solo.data.roles.trainable_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Control:
    """A control token of a template, by its field name in :class:`~megatron_solo.spec.SoloVocab`."""

    name: str


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    layout: str  # "turns" or "inst" (the module's docstring)
    stop: Optional[str] = None  # SoloTokenIds field of the token that ends an answer
    bos: bool = True  # a BOS opens the document
    turn_open: tuple = ()  # turns: Control / text ("{role}") pieces before a message's parts
    turn_close: tuple = ()  # turns: Control / text pieces after them
    text_role: Optional[str] = None  # turns: the role every text is trained as (None: the message's own)
    user_turn: str = "{text}"  # inst: a user turn's text (stripped) in its markers, encoded as plain text
    answer_end: Optional[str] = None  # inst: SoloTokenIds field appended to each assistant turn
    image_close: Optional[str] = None  # inst: SoloTokenIds field that replaces an image block's last token
    trim: bool = False  # turns: a message's text stripped at both ends (Llama-3's template: ``| trim``)


CHATML = ChatTemplate("chatml", "turns", stop="im_end",
                      turn_open=(Control("im_start"), "{role}\n"), turn_close=(Control("im_end"), "\n"))
# SOLO's SFT code closed its images with <vision>, not </vision>; Mistral's markers are plain text
SOLO_INST = ChatTemplate("solo-inst", "inst", stop="eos", user_turn="[INST] {text} [/INST]", answer_end="eos",
                         image_close="vision_start")
# Llama-3's chat format as its Instruct models' template writes it (Llama-3-8B-Instruct's
# tokenizer_config.json): BOS, then per message <|start_header_id|>{role}<|end_header_id|>\n\n{content |
# trim}<|eot_id|>; <|eot_id|> ends an answer. (3.1+ templates also write a dated system header by default:
# text a user's own system message can carry.)
LLAMA3 = ChatTemplate("llama3", "turns", stop="eot", trim=True,
                      turn_open=(Control("start_header"), "{role}", Control("end_header"), "\n\n"),
                      turn_close=(Control("eot"),))
PRETRAIN = ChatTemplate("pretrain", "turns", text_role="assistant")

TEMPLATES = {t.name: t for t in (CHATML, SOLO_INST, LLAMA3)}
CHAT_TEMPLATES = tuple(TEMPLATES)  # --chat-template's choices


def missing_controls(template: ChatTemplate, ids) -> list[str]:
    """The control tokens ``template`` places that the vocabulary ``ids`` has no id for (Llama-3's header
    tokens over a Qwen or Mistral base): the template cannot be used with that tokenizer."""
    names = [p.name for p in (*template.turn_open, *template.turn_close) if isinstance(p, Control)]
    names += [n for n in (template.stop, template.answer_end, template.image_close) if n]
    return [n for n in dict.fromkeys(names) if getattr(ids, n, None) is None]
