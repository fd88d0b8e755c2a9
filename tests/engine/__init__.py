"""The PyTorch engine (mesh402.engine): architectures vs transformers, dequantization, KV cache and prefix
reuse, tokenizer, chat template, sampling, replay of a stage, expert parallelism in process."""
