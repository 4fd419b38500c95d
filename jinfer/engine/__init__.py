"""The engine loop and its host state: requests, sequences, scheduler, block manager."""
