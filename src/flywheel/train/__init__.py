"""Trainers: the shared loop (loop.py) and one module per stage (pretrain, sft, reward, dpo, ppo); beside them
ensemble (reward-model ensembles), likelihood (a reward that also reads the policy's likelihood) and reporting
(--report-to: TensorBoard, W&B)."""
