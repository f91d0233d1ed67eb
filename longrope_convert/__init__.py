"""longrope-convert: LongRoPE long-context checkpoints from Hugging Face Llama models."""

__version__ = "0.1.0"
