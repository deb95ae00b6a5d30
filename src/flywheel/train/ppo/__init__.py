"""PPO and PPO-ptx (InstructGPT, with the "N+ implementation details of RLHF with PPO").

Modules: config (PPOConfig), advantages (KL-penalised rewards, GAE, whitening), losses (clipped policy/value losses),
experience (the rollout batch), roles (actor, critic, reference, reward), rollout (engine sampling -> Experience),
packing (a prompt's K rollouts in one shared-prompt row), reward_fns (Python reward functions, --reward-fn),
trainer (`train_ppo(cfg)` and the `flywheel ppo` command), rl (`flywheel rl`: GRPO, RLOO, REINFORCE++ and PPO on the
same roles and loop).
"""
