"""Text in and out: tokenizers (tokenizer.json, sentencepiece, GGUF vocab), chat templates and
the incremental detokenizer."""
