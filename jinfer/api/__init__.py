"""What users import: `LLM`, `SamplingParams`, the outputs and beam search."""
