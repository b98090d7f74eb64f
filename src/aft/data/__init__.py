"""AFT training data: proposal sources, scorers, targets, the builder and its data card.

    sources.py        off-policy datasets (UltraFeedback, generic), plain prompts, K selection, shards
    reasoning_gym.py  reasoning-gym prompts with answers, train/eval split by distinct question text
    onpolicy.py       on-policy proposal prompts (chat template or demonstrations), engine loading
    scorers.py        verifier, reward model, LLM judge
    targets.py        teacher / best / reference targets
    verify.py         answer extraction + verification (shared with evaluation)
    build.py          DataConfig, run_build, merge_shards
    card.py           the data card
"""

from .build import DataConfig, Resources, load_config, merge_shards, run_build  # noqa: F401
