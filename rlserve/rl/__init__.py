"""RL post-training: advantage estimators, policy and value losses, and the training loop."""
