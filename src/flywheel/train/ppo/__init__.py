"""PPO and PPO-ptx (InstructGPT, with the "N+ implementation details of RLHF with PPO").

Modules: config (PPOConfig), advantages (KL-penalised rewards, GAE, whitening), losses (clipped policy/value losses),
experience (the rollout batch), roles (actor, critic, reference, reward), rollout (engine sampling -> Experience),
trainer (`train_ppo(cfg)` and the `flywheel ppo` command).
"""
