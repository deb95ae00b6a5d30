"""Evaluation: everything that measures a model rather than trains it.

- `flywheel.eval.policy`: policies judged by the toy world's hidden oracle on held-out prompts (per-axis scores,
  deflection rates, win rates with a 95% interval, KL to a reference, held-out LM loss, few-shot curves).
- `flywheel.eval.reward`: reward models against held-out rankings (pairwise accuracy with Wilson's interval, Kendall
  tau, score histogram; `flywheel eval rm`) and against the oracle (`heldout_accuracy`, `deflection_contrasts`,
  `knowledge_contrasts`).
- `flywheel.eval.cli`: the `flywheel eval <what>` command.
"""
