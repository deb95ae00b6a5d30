"""Trainers: the shared loop (loop.py) and one module per stage (pretrain, sft, reward, dpo, ppo)."""
