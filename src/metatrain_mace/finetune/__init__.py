"""Fine-tuning: which weights train when starting from a checkpoint (full, heads,
LoRA, replay heads), and the LoRA adapters themselves."""
