"""flywheel: the ChatGPT recipe (SFT -> reward model -> PPO, and the feedback loop) on PyTorch + transformers."""

__version__ = "0.1.0"
