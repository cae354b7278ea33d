"""vLLM's plugin entry point (``vllm.general_plugins`` in setup.py): vLLM calls :func:`register` in each of its
processes before it loads a model; importing this module does nothing."""

#: config.json's ``architectures`` of a SOLO export (convert/hf_config.py) -> the vLLM class serving it
ARCHITECTURES = {
    "SoloForCausalLM": "SoloMistralForCausalLM",  # SOLO-7B's name (Mistral base)
    "SoloLlamaForCausalLM": "SoloLlamaForCausalLM",
    "SoloQwen2ForCausalLM": "SoloQwen2ForCausalLM",
    "SoloQwen3ForCausalLM": "SoloQwen3ForCausalLM",
}


def register() -> None:
    """Register SOLO's architectures with vLLM's ``ModelRegistry`` (vLLM itself is left as it is)."""
    from vllm import ModelRegistry

    from megatron_solo.serve import vllm_model  # local: vLLM's model code loads only when vLLM itself asks

    for arch, cls in ARCHITECTURES.items():
        if arch not in ModelRegistry.get_supported_archs():
            # the class itself, not a "module:Class" string: a lazy entry is inspected in a fresh subprocess
            ModelRegistry.register_model(arch, getattr(vllm_model, cls))
