"""Serving SOLO exports with other engines (docs/SERVING.md).

* :mod:`megatron_solo.serve.vllm_plugin`: vLLM's ``vllm.general_plugins`` entry point (setup.py); it registers
  SOLO's architectures with vLLM's ``ModelRegistry`` when vLLM starts.
* :mod:`megatron_solo.serve.vllm_model`: the vLLM models (vLLM's own decoder of each base family plus SOLO's
  patch embedding) and their multimodal processor (SOLO's image layout).
* :mod:`megatron_solo.serve.prompts`: a prompt in vLLM's form from SOLO's processor (no vLLM import).

Importing this package imports nothing (vLLM is imported by the modules that need it, which run in a vLLM
environment: requirements-vllm.txt).
"""
