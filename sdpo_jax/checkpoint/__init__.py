"""Reading and writing model checkpoints: safetensors, Hugging Face folders, GGUF."""
