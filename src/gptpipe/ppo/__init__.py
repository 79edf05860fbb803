"""gptpipe's own PPO for RLHF (TRL 1.x removed PPOTrainer and its value-head models, and nothing else
maintained does InstructGPT-style PPO on the transformers/accelerate/peft stack with exact resume).

Small single-purpose modules: ``kl`` (estimators and the KL coefficient controllers), ``advantages``
(per-token rewards, GAE, whitening), ``losses`` (clipped policy and value losses, entropy). The math
follows ../shared/design/PPO-NOTES.md (Ziegler et al. 2019; Schulman et al. 2015/2017; Huang et al. 2023).
"""
