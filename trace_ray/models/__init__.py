"""Model and tokenizer loading: HF folders or ids, GGUF files, and tiny local models for tests."""
