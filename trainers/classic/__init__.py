"""Auxiliary (non-LLM) trainers and optimizers."""
