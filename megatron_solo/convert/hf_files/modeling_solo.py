"""SOLO: one decoder-only transformer over raw 32x32 image patches and text (arXiv 2407.06438).

The backbone is exactly the base's: Mistral's (``transformers``' ``MistralModel``, SOLO-7B), or, for a
SOLO model on another base (``solo_family`` in config.json), ``LlamaModel``, ``Qwen2Model`` or
``Qwen3Model`` (classes ``Solo<Family>ForCausalLM``, named by the export's ``auto_map``). SOLO adds one
linear map from a flattened, normalised RGB patch (3072 values) to the hidden size. Its output is *added* to the token
embedding at each ``<vpatch>`` position: the k-th ``<vpatch>`` of the batch (row-major over
``input_ids``) takes the k-th row of ``vision_patches``. Tensor names match the public SOLO-7B
release (``model.embed_vision_patch.weight`` on top of Mistral's names).

Inputs (besides Mistral's):
    vision_patches (`torch.FloatTensor` of shape `(n_patches, 3 * patch**2)`): normalised patches
        (ImageNet mean/std), as ``processing_solo.SoloProcessor`` makes them.
    vision_patch_indices (`torch.LongTensor`, same shape as `input_ids`, optional): row of
        ``vision_patches`` for each position, -1 for text. When omitted it is derived from the
        ``<vpatch>`` tokens in `input_ids`.

    vision_patch_coords (`torch.LongTensor` of shape `(n_patches, 2)`, optional): (row, column) of each
        patch inside its image, in the order of ``vision_patches``; needed when ``config.image_positions``
        is "mrope" and the prompt holds images (``processing_solo.SoloProcessor`` returns them).

Generation uses the key-value cache; image inputs are consumed by the prefill step only.

Vision experts (``vision_experts`` in config.json: "ffn" or "full"; absent: none): the image tokens
(the ``<vpatch>`` positions of ``input_ids``) go through their own copies of some modules of every
decoder layer, ``vision_post_attention_layernorm`` and ``vision_mlp`` ("ffn"), and also
``vision_input_layernorm`` and ``self_attn.vision_{q,k,v,o}_proj`` ("full"); attention itself is joint
over all tokens. Each token is computed once: the rows of each modality go through their own module
and are put back in place. Such a model needs ``input_ids`` (the routing is read from them), in
``forward`` and in every ``generate`` step.

The image choices of the SOLO line (config.json's ``image_attention``, ``image_positions``; SOLO's
"causal" and "1d" by default, which leave everything above as it is):
    "bidirectional": the tokens of one image block (``<vision>`` to ``</vision>``, a video clip included)
        attend to each other in both directions; all else stays causal. The prompt's mask is built with
        transformers' ``create_causal_mask`` (or its sliding-window form) and an ``or_mask_function``;
        images must come in the first step (the prompt), decoding steps are causal.
    "mrope": multimodal RoPE. Text advances (t, h, w) together; the patches of an image start at st (one
        past ``<vision>``) and sit at (st + frame, st + row, st + column); a row or frame separator takes the
        frame and row of the patch before it and the next column; the token after the block continues at
        st + max(frame, row, column) + 1; positions restart after padding. The rotary channel pairs are
        split among the three by ``config.mrope_section``. ``generate`` computes the positions of every step
        from the whole sequence, so cached decoding continues where the prompt ended.

Supported transformers releases: 4.45 to 5.24 (tests/test_hf_compat.py generates with 4.45.2 and the
pinned release and compares). What differs between them is found by looking, not by version numbers:
the cache keyword (``cache`` in 5.x, ``past_key_values`` before; both are accepted), whether Mistral's
config knows ``rope_parameters``, whether ``generate`` says which step is the first, and whether the
model has a ``loss_function``.
"""

import contextvars
import copy
import importlib
import inspect

import torch
from torch import nn
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.mistral.configuration_mistral import MistralConfig
from transformers.models.mistral.modeling_mistral import MistralForCausalLM, MistralModel, MistralPreTrainedModel

from .configuration_solo import SoloConfig, SoloLlamaConfig, SoloQwen2Config, SoloQwen3Config

# The name of the key-value cache in Mistral's forward and in model outputs of this transformers release.
CACHE_KW = "cache" if "cache" in inspect.signature(MistralModel.forward).parameters else "past_key_values"
# Before transformers 5, Mistral reads ``config.rope_theta``; an export writes ``rope_parameters``.
_LEGACY_ROPE = "rope_parameters" not in MistralConfig().to_dict()


def _legacy_rope(config) -> None:
    """Releases before 5 read ``rope_theta`` and ``rope_scaling`` (Llama-3.1's llama3 scaling)."""
    rope = getattr(config, "rope_parameters", None)
    if _LEGACY_ROPE and isinstance(rope, dict) and "rope_theta" in rope:
        config.rope_theta = float(rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}


def _keep_last(hidden_states: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The positions the logits are computed for: the last ``n`` (0: all) or the given indices."""
    if isinstance(logits_to_keep, int):
        return hidden_states if logits_to_keep == 0 else hidden_states[:, -logits_to_keep:, :]
    return hidden_states[:, logits_to_keep, :]


def _is_prefill(cache, cache_position) -> bool:
    """True on the step that reads the prompt (nothing cached yet)."""
    if cache_position is not None and cache_position.numel():
        return int(cache_position.reshape(-1)[0]) == 0
    return cache is None or (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0)


def vision_patch_indices_from_ids(input_ids: torch.LongTensor, vision_patch_token_id: int) -> torch.LongTensor:
    """-1 for text, k for the k-th ``<vpatch>`` of the batch in row-major order."""
    is_patch = input_ids == vision_patch_token_id
    order = torch.cumsum(is_patch.reshape(-1).long(), 0).reshape(input_ids.shape) - 1
    return torch.where(is_patch, order, torch.full_like(order, -1))


# The image-token mask ([batch, seq] bool) of the forward pass in progress, set by SoloModel.forward for the
# length of its call and read by the routed modules of a model with vision experts.
_IMAGE_MASK = contextvars.ContextVar("solo_image_mask", default=None)

# The modules of a decoder layer that image tokens have their own copy of, per ``vision_experts``; the
# copy of ``a.b`` is ``a.vision_b``.
VISION_EXPERT_MODULES = {
    "none": (),
    "ffn": ("post_attention_layernorm", "mlp"),
    "full": ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "post_attention_layernorm", "mlp"),
}


class _ByModality:
    """Stands in for a text module's ``forward``: its text rows through the module itself, its image rows
    through the vision twin, each row once, put back in place."""

    def __init__(self, text_forward, vision: nn.Module):
        self.text_forward = text_forward
        self.vision = vision.forward  # a plain reference: the twin is registered once, beside the text module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        image = _IMAGE_MASK.get()
        if image is None or image.shape != x.shape[:-1]:
            raise RuntimeError("a SOLO model with vision experts routes tokens by input_ids: call it with input_ids "
                               f"(mask {None if image is None else tuple(image.shape)}, hidden {tuple(x.shape)})")
        text_out = self.text_forward(x[~image])
        image_out = self.vision(x[image])
        out = text_out.new_empty(*image.shape, text_out.shape[-1])
        out[~image] = text_out
        out[image] = image_out.to(text_out.dtype)
        return out


def add_vision_experts(layers, vision_experts: str) -> None:
    """Give every decoder layer the image tokens' modules (copies of their text twins; the weights are
    then loaded or initialised as usual) and route each text module's calls by modality."""
    for layer in layers:
        for path in VISION_EXPERT_MODULES[vision_experts]:
            *parents, name = path.split(".")
            owner = layer
            for p in parents:
                owner = getattr(owner, p)
            text = getattr(owner, name)
            vision = copy.deepcopy(text)
            owner.add_module(f"vision_{name}", vision)
            text.forward = _ByModality(text.forward, vision)


def _shift_right(x: torch.Tensor, fill) -> torch.Tensor:
    return torch.cat([torch.full_like(x[:, :1], fill), x[:, :-1]], dim=1)


def _segments(attention_mask: torch.Tensor) -> torch.Tensor:
    """[b, s] numbers that change where padding starts or ends (positions restart there)."""
    m = attention_mask.long()
    return torch.cumsum((m != _shift_right(m, -1)).long(), dim=1)


def _layout_ids(config):
    return (config.vision_start_token_id, config.vision_patch_token_id, config.vision_row_sep_token_id,
            config.vision_frame_sep_token_id, config.vision_end_token_id)


def image_block_ids(input_ids: torch.LongTensor, segments: torch.Tensor, config) -> torch.LongTensor:
    """0 outside images, else a number >= 1 shared by the tokens of one ``<vision>``...``</vision>`` block."""
    start, _, _, _, end = _layout_ids(config)
    is_img = torch.isin(input_ids, torch.tensor(_layout_ids(config), device=input_ids.device))
    first = is_img & (~_shift_right(is_img, False) | (segments != _shift_right(segments, -1))
                      | (input_ids == start) | (_shift_right(input_ids, -1) == end))
    return torch.cumsum(first.long(), dim=1) * is_img.long()


def mrope_position_ids(input_ids: torch.LongTensor, patch_coords, segments: torch.Tensor, config) -> torch.LongTensor:
    """(temporal, row, column) positions [3, b, s] of the module docstring's rule."""
    _, patch, row_sep, frame_sep, _ = _layout_ids(config)
    b, s = input_ids.shape
    dev = input_ids.device
    is_patch = input_ids == patch
    is_frame_sep = input_ids == frame_sep
    inner = is_patch | (input_ids == row_sep) | is_frame_sep
    n = int(is_patch.sum())
    coords = torch.zeros(b, s, 2, dtype=torch.long, device=dev)
    if n:
        if patch_coords is None or tuple(patch_coords.shape) != (n, 2):
            got = None if patch_coords is None else tuple(patch_coords.shape)
            raise ValueError(f"image positions 'mrope' need vision_patch_coords [{n}, 2] (the (row, column) of each "
                             f"of the {n} <vpatch> tokens; the processor returns them), got {got}")
        coords[is_patch] = patch_coords.to(dev).long()
    i = torch.arange(s, device=dev).expand(b, s)
    new_seg = segments != _shift_right(segments, -1)
    run_first = inner & (~_shift_right(inner, False) | new_seg)
    run_start = torch.cummax(torch.where(run_first, i, torch.zeros_like(i)), dim=1).values
    next_inner = torch.cat([inner[:, 1:] & ~new_seg[:, 1:], torch.zeros_like(inner[:, :1])], dim=1)
    run_last = inner & ~next_inner
    frames_before = torch.cumsum(is_frame_sep.long(), dim=1) - is_frame_sep.long()
    frame = frames_before - torch.gather(frames_before, 1, run_start)
    last_patch = torch.cummax(torch.where(is_patch, i, torch.full_like(i, -1)), dim=1).values
    has_patch = (last_patch >= run_start) & inner & ~is_patch
    lp = last_patch.clamp(min=0)
    sep_row = torch.where(has_patch, torch.gather(coords[..., 0], 1, lp), 0)
    sep_col = torch.where(has_patch, torch.gather(coords[..., 1], 1, lp) + 1, 0)
    row = torch.where(is_patch, coords[..., 0], sep_row) * inner
    col = torch.where(is_patch, coords[..., 1], sep_col) * inner
    frame = frame * inner
    key = (torch.arange(b, device=dev)[:, None] * s + run_start).reshape(-1)
    top = torch.maximum(torch.maximum(frame, row), col).reshape(-1)
    flat = inner.reshape(-1)
    extent = torch.zeros(b * s, dtype=torch.long, device=dev).scatter_reduce(0, key[flat], top[flat], reduce="amax")
    advance = torch.where(inner, torch.where(run_last, extent[key].reshape(b, s) + 1, 0), 1)
    before = torch.cumsum(advance, dim=1) - advance
    seg_start = torch.cummax(torch.where(new_seg, i, torch.zeros_like(i)), dim=1).values
    base = before - torch.gather(before, 1, seg_start)
    return torch.stack([base + frame, base + row, base + col])


class MultimodalRotary(nn.Module):
    """The base's rotary embedding for [3, b, s] positions: each rotary channel pair takes its angle from
    the component ``mrope_section`` gives it (temporal, row, column), as megatron-core's
    ``MultimodalRotaryEmbedding``; [b, s] positions go to the base's rotary unchanged."""

    def __init__(self, rotary: nn.Module, mrope_section):
        super().__init__()
        self.rotary = rotary
        self.mrope_section = list(mrope_section)

    def forward(self, x, position_ids):
        if position_ids.dim() == 2:
            return self.rotary(x, position_ids)
        cos, sin = zip(*(self.rotary(x, p) for p in position_ids))  # each [b, s, head_dim]
        comp = torch.repeat_interleave(torch.arange(3, device=x.device), torch.tensor(self.mrope_section,
                                                                                      device=x.device))
        comp = torch.cat([comp, comp])  # both halves of the non-interleaved rotation

        def pick(parts):
            t = torch.stack(parts)  # [3, b, s, head_dim]
            return t.gather(0, comp.view(1, 1, 1, -1).expand(1, *t.shape[1:])).squeeze(0)

        return pick(cos), pick(sin)


def _cache_length(cache) -> int:
    return int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0


def _solo_classes(config_cls, pretrained_base, model_base, causal_lm_base, names, tied_weights_keys):
    """SOLO's three classes over one base family's transformers classes (the family's decoder, its
    RoPE, norms and attention; SOLO adds the patch embedding and the vision inputs). ``names``: the
    (pre-trained, model, causal LM) class names, as an export's ``auto_map`` gives them;
    ``tied_weights_keys``: the base's tying rule (used only when ``config.tie_word_embeddings``)."""

    class SoloPreTrainedModel(pretrained_base):
        config_class = config_cls
        config: config_cls

    class SoloModel(SoloPreTrainedModel, model_base):
        """The base's decoder plus ``embed_vision_patch`` (3072 -> hidden, no bias)."""

        def __init__(self, config):
            _legacy_rope(config)
            super().__init__(config)
            self.embed_vision_patch = nn.Linear(config.vision_patch_dim, config.hidden_size, bias=False)
            add_vision_experts(self.layers, getattr(config, "vision_experts", "none"))
            if getattr(config, "image_positions", "1d") == "mrope":
                self.rotary_emb = MultimodalRotary(self.rotary_emb, config.mrope_section)
            self.post_init()

        def image_choices_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, vision_patch_coords,
                                 cache):
            """(attention mask, position ids) under the config's image choices (module docstring)."""
            cfg = self.config
            past = _cache_length(cache)
            b, q = inputs_embeds.shape[:2]
            if attention_mask is None:
                attention_mask = torch.ones(b, past + q, dtype=torch.long, device=inputs_embeds.device)
            if attention_mask.dim() != 2:  # a caller's own 4D mask and positions are used as given
                return attention_mask, position_ids
            segments = _segments(attention_mask)
            if getattr(cfg, "image_positions", "1d") == "mrope" and (position_ids is None or position_ids.dim() == 2):
                if past or input_ids is None:
                    raise ValueError("image positions 'mrope': pass position_ids [3, batch, length] with a cache or "
                                     "inputs_embeds (generate computes them from the whole sequence)")
                position_ids = mrope_position_ids(input_ids, vision_patch_coords, segments, cfg)
            if getattr(cfg, "image_attention", "causal") == "bidirectional" and input_ids is not None:
                blocks = image_block_ids(input_ids, segments[:, -q:], cfg)
                if bool((blocks > 0).any()):
                    if past:
                        raise ValueError("bidirectional image attention: images must come with the prompt (the first "
                                         "step), not after cached tokens")
                    attention_mask = self._image_block_mask(inputs_embeds, attention_mask, cache, blocks)
            return attention_mask, position_ids

        def _image_block_mask(self, inputs_embeds, attention_mask, cache, blocks):
            """transformers' causal (or sliding-window) mask, or'ed with "the same image block"."""
            from transformers import masking_utils

            cfg = self.config
            window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
            make = masking_utils.create_causal_mask if window is None else masking_utils.create_sliding_window_causal_mask
            params = inspect.signature(make).parameters
            if "or_mask_function" not in params:
                raise ValueError("bidirectional image attention needs a transformers release whose masks take an "
                                 "or_mask_function (4.53 or newer)")

            def same_block(batch_idx, head_idx, q_idx, kv_idx):
                bq = blocks[batch_idx, q_idx]
                return (bq > 0) & (bq == blocks[batch_idx, kv_idx])

            cache_kw = "cache" if "cache" in params else "past_key_values"
            kw = {cache_kw: cache}
            if "cache_position" in params:  # releases before 5 ask for it
                kw["cache_position"] = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
            return make(config=cfg, inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=None,
                        or_mask_function=same_block, **kw)

        def embed_inputs(
            self,
            input_ids: torch.LongTensor,
            vision_patches: torch.Tensor | None = None,
            vision_patch_indices: torch.LongTensor | None = None,
        ) -> torch.Tensor:
            inputs_embeds = self.embed_tokens(input_ids)
            if vision_patches is None:
                return inputs_embeds
            if vision_patch_indices is None:
                vision_patch_indices = vision_patch_indices_from_ids(input_ids, self.config.vision_patch_token_id)
            if vision_patch_indices.shape != input_ids.shape:
                raise ValueError(f"vision_patch_indices {tuple(vision_patch_indices.shape)} must have the shape of "
                                 f"input_ids {tuple(input_ids.shape)}")
            if vision_patches.ndim != 2 or vision_patches.shape[-1] != self.config.vision_patch_dim:
                raise ValueError(f"vision_patches must be (n_patches, {self.config.vision_patch_dim}), "
                                 f"got {tuple(vision_patches.shape)}")
            at = vision_patch_indices >= 0
            idx = vision_patch_indices[at]
            if idx.numel() and int(idx.max()) >= vision_patches.shape[0]:
                raise ValueError(f"vision_patch_indices refer to patch {int(idx.max())} but only "
                                 f"{vision_patches.shape[0]} patches were given")
            patch_embeds = self.embed_vision_patch(vision_patches.to(self.embed_vision_patch.weight.dtype))
            added = torch.zeros_like(inputs_embeds)
            added[at] = patch_embeds[idx].to(inputs_embeds.dtype)
            return inputs_embeds + added

        def forward(
            self,
            input_ids: torch.LongTensor | None = None,
            vision_patches: torch.Tensor | None = None,
            vision_patch_indices: torch.LongTensor | None = None,
            inputs_embeds: torch.Tensor | None = None,
            vision_patch_coords: torch.LongTensor | None = None,
            **kwargs,
        ) -> BaseModelOutputWithPast:
            routed = getattr(self.config, "vision_experts", "none") != "none"
            if routed and input_ids is None:
                raise ValueError("a SOLO model with vision experts routes tokens by input_ids: pass input_ids")
            image = _IMAGE_MASK.set(input_ids == self.config.vision_patch_token_id) if routed else None
            try:
                ids = input_ids
                if vision_patches is not None:
                    if inputs_embeds is not None:
                        raise ValueError("pass vision_patches with input_ids, not with inputs_embeds")
                    inputs_embeds = self.embed_inputs(input_ids, vision_patches, vision_patch_indices)
                    input_ids = None
                cfg = self.config
                if (getattr(cfg, "image_attention", "causal") != "causal"
                        or getattr(cfg, "image_positions", "1d") != "1d"):
                    if inputs_embeds is None:
                        inputs_embeds = self.embed_tokens(input_ids)
                        input_ids = None
                    cache = kwargs.get(CACHE_KW, kwargs.get("past_key_values"))
                    kwargs["attention_mask"], kwargs["position_ids"] = self.image_choices_inputs(
                        ids, inputs_embeds, kwargs.get("attention_mask"), kwargs.get("position_ids"),
                        vision_patch_coords, cache)
                return model_base.forward(self, input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
            finally:
                if image is not None:
                    _IMAGE_MASK.reset(image)

    class SoloForCausalLM(SoloPreTrainedModel, GenerationMixin):
        _tied_weights_keys = tied_weights_keys
        _tp_plan = {"lm_head": "colwise_gather_output"}
        _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

        def __init__(self, config):
            _legacy_rope(config)
            super().__init__(config)
            self.model = SoloModel(config)
            self.vocab_size = config.vocab_size
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def get_input_embeddings(self):
            return self.model.embed_tokens

        def get_output_embeddings(self):
            return self.lm_head

        def forward(
            self,
            input_ids: torch.LongTensor | None = None,
            vision_patches: torch.Tensor | None = None,
            vision_patch_indices: torch.LongTensor | None = None,
            attention_mask: torch.Tensor | None = None,
            position_ids: torch.LongTensor | None = None,
            cache=None,
            vision_patch_coords: torch.LongTensor | None = None,
            inputs_embeds: torch.Tensor | None = None,
            labels: torch.LongTensor | None = None,
            use_cache: bool | None = None,
            logits_to_keep: int | torch.Tensor = 0,
            **kwargs,
        ) -> CausalLMOutputWithPast:
            if cache is None and "past_key_values" in kwargs:
                cache = kwargs.pop("past_key_values")
            kwargs.pop("return_dict", None)  # outputs are always a ModelOutput
            outputs = self.model(
                input_ids=input_ids,
                vision_patches=vision_patches,
                vision_patch_indices=vision_patch_indices,
                vision_patch_coords=vision_patch_coords,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **{CACHE_KW: cache},
                **kwargs,
            )
            logits = self.lm_head(_keep_last(outputs.last_hidden_state, logits_to_keep))
            loss = None
            if labels is not None:
                if hasattr(self, "loss_function"):
                    loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                              **kwargs)
                else:  # transformers < 4.46: next-token cross-entropy, -100 ignored
                    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
            return CausalLMOutputWithPast(
                loss=loss,
                logits=logits,
                hidden_states=outputs.hidden_states,
                attentions=outputs.attentions,
                **{CACHE_KW: getattr(outputs, CACHE_KW)},
            )

        def prepare_inputs_for_generation(self, input_ids, *args, vision_patches=None, vision_patch_indices=None,
                                          vision_patch_coords=None, **kwargs):
            first = kwargs.get("is_first_iteration")
            if first is None:  # releases whose generate() does not say it: the step with an empty cache
                first = _is_prefill(kwargs.get(CACHE_KW, args[0] if args else None), kwargs.get("cache_position"))
            # The base's own preparation (GenerationMixin's in 5.x, the family class's in 4.45).
            model_inputs = causal_lm_base.prepare_inputs_for_generation(self, input_ids, *args, **kwargs)
            # Patches enter through the prompt's embeddings: the prefill step (or every step when no cache
            # is kept and the whole sequence is recomputed) takes them; cached decode steps do not.
            recompute_all = not kwargs.get("use_cache", True)
            if vision_patches is not None and (first or recompute_all):
                ids = model_inputs["input_ids"]
                if vision_patch_indices is not None and vision_patch_indices.shape != ids.shape:
                    vision_patch_indices = None  # derived again from the <vpatch> tokens of `ids`
                model_inputs["vision_patches"] = vision_patches
                model_inputs["vision_patch_indices"] = vision_patch_indices
            if getattr(self.config, "image_positions", "1d") == "mrope":
                # Every step's positions from the whole sequence so far: decoding continues after the prompt's
                # largest position (the cache holds the prompt; its images need their patches' coordinates).
                mask = kwargs.get("attention_mask")
                mask = torch.ones_like(input_ids) if mask is None or mask.dim() != 2 else mask
                pos = mrope_position_ids(input_ids, vision_patch_coords, _segments(mask), self.config)
                step = model_inputs.get("input_ids")
                if step is None:
                    step = model_inputs["inputs_embeds"]
                model_inputs["position_ids"] = pos[:, :, -step.shape[1]:]
            return model_inputs

    for cls, name in zip((SoloPreTrainedModel, SoloModel, SoloForCausalLM), names):
        cls.__name__ = cls.__qualname__ = name
        cls.__module__ = __name__
    return SoloPreTrainedModel, SoloModel, SoloForCausalLM


# SOLO-7B's classes (Mistral), under the names of the public release and of earlier exports.
SoloPreTrainedModel, SoloMistralModel, SoloForCausalLM = _solo_classes(
    SoloConfig, MistralPreTrainedModel, MistralModel, MistralForCausalLM,
    ("SoloPreTrainedModel", "SoloMistralModel", "SoloForCausalLM"), {})


def _family_classes(module: str, base: str, config_cls):
    """SOLO's classes over ``transformers.models.<module>``'s ``<base>*`` classes; Nones where this
    transformers lacks the family (Qwen3 before 4.51)."""
    if config_cls is None:
        return None, None, None
    mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    return _solo_classes(config_cls, getattr(mod, f"{base}PreTrainedModel"), getattr(mod, f"{base}Model"),
                         getattr(mod, f"{base}ForCausalLM"),
                         (f"Solo{base}PreTrainedModel", f"Solo{base}Model", f"Solo{base}ForCausalLM"),
                         getattr(mod, f"{base}ForCausalLM")._tied_weights_keys)  # tied in Llama-3.2-1B/3B, small Qwens


SoloLlamaPreTrainedModel, SoloLlamaModel, SoloLlamaForCausalLM = _family_classes("llama", "Llama", SoloLlamaConfig)
SoloQwen2PreTrainedModel, SoloQwen2Model, SoloQwen2ForCausalLM = _family_classes("qwen2", "Qwen2", SoloQwen2Config)
SoloQwen3PreTrainedModel, SoloQwen3Model, SoloQwen3ForCausalLM = _family_classes("qwen3", "Qwen3", SoloQwen3Config)


__all__ = [
    "SoloForCausalLM", "SoloMistralModel", "SoloPreTrainedModel",
    "SoloLlamaForCausalLM", "SoloLlamaModel", "SoloQwen2ForCausalLM", "SoloQwen2Model",
    "SoloQwen3ForCausalLM", "SoloQwen3Model",
]
