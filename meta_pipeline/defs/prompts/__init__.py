"""Prompt evolution (ACLA) assets and the LLM resource."""
