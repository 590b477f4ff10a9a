"""Reinforcement-learning allocation (RAMP): unit embeddings and the allocation environment."""
