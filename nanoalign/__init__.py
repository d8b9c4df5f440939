"""nanoalign: LLM alignment from scratch in plain PyTorch."""
