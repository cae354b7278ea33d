"""The architecture presets of ``--model`` (``SoloModelArgs.from_preset``, megatron_solo/model/config.py): plain
data in a module that imports nothing, so that the launchers' pre-flight checks a preset name and sizes its
model before torch loads.
"""

PRESETS: dict[str, dict] = {
    # Exactly Mistral-7B-v0.1's shapes (SOLO-7B), with SOLO's 33031-piece vocabulary.
    "solo-7b": dict(
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=14336,
        num_attention_heads=32,
        num_query_groups=8,
        kv_channels=128,
        max_position_embeddings=32768,
        rotary_base=10000,
        norm_epsilon=1e-5,
        sliding_window=4096,
        init_method_std=0.02,
    ),
    # A few million parameters (most of them the 33031-row embedding and output layer); GQA 4:2.
    "tiny": dict(
        num_layers=4,
        hidden_size=128,
        ffn_hidden_size=352,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=32,
        max_position_embeddings=4096,
        rotary_base=10000,
        norm_epsilon=1e-5,
        sliding_window=256,
        init_method_std=0.02,
    ),
    # The public config.json values of these bases, written from knowledge of those files (nothing is
    # downloaded); vocab_size is SOLO's vocabulary over the base tokenizer's full length (docs/DATA_FORMAT.md
    # "Tokenizer and SOLO's vocabulary": Qwen reuses its own <|im_start|>/<|im_end|>, so 1029 pieces are added; Llama 1031).
    # Qwen3-8B(-Base): tokenizer 151669 tokens (embedding padded to 151936 in the base).
    "qwen3-8b": dict(
        family="qwen3", qk_layernorm=True, vocab_size=151669 + 1029, vision_patch_id=151669 + 1,
        num_layers=36, hidden_size=4096, ffn_hidden_size=12288, num_attention_heads=32, num_query_groups=8,
        kv_channels=128, max_position_embeddings=32768, rotary_base=1000000, norm_epsilon=1e-6,
        sliding_window=None, init_method_std=0.02,
    ),
    # Qwen3-1.7B(-Base): head_dim 128 while hidden/heads is 2048/16; tied embeddings.
    "qwen3-1.7b": dict(
        family="qwen3", qk_layernorm=True, tie_word_embeddings=True, vocab_size=151669 + 1029,
        vision_patch_id=151669 + 1,
        num_layers=28, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=16, num_query_groups=8,
        kv_channels=128, max_position_embeddings=32768, rotary_base=1000000, norm_epsilon=1e-6,
        sliding_window=None, init_method_std=0.02,
    ),
    # Qwen2.5-7B: QKV bias; tokenizer 151665 tokens (embedding padded to 152064 in the base).
    "qwen2.5-7b": dict(
        family="qwen2", qkv_bias=True, vocab_size=151665 + 1029, vision_patch_id=151665 + 1,
        num_layers=28, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28, num_query_groups=4,
        kv_channels=128, max_position_embeddings=131072, rotary_base=1000000, norm_epsilon=1e-6,
        sliding_window=None, init_method_std=0.02,
    ),
    # Llama-3.1-8B: 128256 tokens (256 of them reserved specials), llama3 RoPE scaling factor 8.
    "llama3.1-8b": dict(
        family="llama", rope_scaling="llama3", rope_scaling_factor=8.0, vocab_size=128256 + 1031,
        vision_patch_id=128256 + 1,
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8,
        kv_channels=128, max_position_embeddings=131072, rotary_base=500000, norm_epsilon=1e-5,
        sliding_window=None, init_method_std=0.02,
    ),
}
