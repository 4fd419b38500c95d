"""The engine loop (llm_engine) and its host state: requests, sequences, the scheduler and the
block manager that decide every row and block, the finishing rules (stopping), and the calls
left in flight (lookahead)."""
