"""A prompt in vLLM's form from SOLO's processor: the ids the processor makes (the training data's, token for
token), each image block collapsed to the one ``<vision>`` that marks it, and the images; vLLM's SOLO
processor (:mod:`megatron_solo.serve.vllm_model`) lays each block out again. No vLLM import."""

from __future__ import annotations


def collapse_image_blocks(ids, vision_start: int, vision_end: int) -> list[int]:
    """``ids`` with each ``<vision>`` ... ``</vision>`` block replaced by its ``<vision>``."""
    out, inside = [], False
    for i in ids:
        i = int(i)
        if inside:
            inside = i != vision_end
        elif i == vision_start:
            out.append(i)
            inside = True
        else:
            out.append(i)
    if inside:
        raise ValueError("an image block (<vision>) is not closed by </vision>")
    return out


def vllm_prompt(processor, parts=None, *, messages=None, template: str | None = None) -> dict:
    """``{"prompt_token_ids", "multi_modal_data"}`` for ``LLM.generate`` from a ``SoloProcessor`` (an export's
    ``processing_solo.SoloProcessor.from_pretrained(export)``): ``parts`` (text and PIL images, pre-training
    style, BOS first) or chat ``messages`` (``processor.chat`` with ``template``, by default the model's)."""
    if (parts is None) == (messages is None):
        raise ValueError("pass parts or messages")
    images = [p for m in (messages or [{"content": parts}])
              for p in (m["content"] if isinstance(m["content"], list) else [m["content"]])
              if not isinstance(p, (str, dict))]
    if messages is None:
        inputs = processor(parts)
    else:
        inputs = processor.chat(messages, **({} if template is None else {"template": template}))
    ids = collapse_image_blocks(inputs["input_ids"][0].tolist(), processor.vocab["vision_start"],
                                processor.vocab["vision_end"])
    prompt = {"prompt_token_ids": ids}
    if images:
        prompt["multi_modal_data"] = {"image": images}
    return prompt
