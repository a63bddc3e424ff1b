"""The networks: the MultiTalk DiT, its attention kernels, RoPE, audio layers and fp8 variants."""
