"""Training: data reading, metrics and the LoRA fine-tuning loop."""
