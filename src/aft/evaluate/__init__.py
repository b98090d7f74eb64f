"""`aft eval`: evaluation at matched compute.

    tasks.py       what is asked: reasoning-gym (offline, held-out split), GSM8K-format
                   JSONL, IFEval (lm-evaluation-harness's own checkers), MT-Bench questions
    strategies.py  how it is answered: greedy, one sample, propose-and-aggregate (K, L),
                   best-of-N with a scorer, majority vote over extracted answers
    cache.py       an Engine wrapper that stores every sample (seeded requests are
                   shared between strategies and never generated twice)
    compute.py     measured tokens per query -> FLOPs (2 x parameters per token,
                   prefill and decode apart) and wall time
    run.py         the loop over tasks x strategies x seeds, one resumable JSONL each
    stats.py       bootstrap intervals
    report.py      Markdown tables and PNG plots, rebuilt from the cached JSONL
    export.py      AlpacaEval / MT-Bench (FastChat) answer files
    judge.py       single-answer 1-10 LLM judge (MT-Bench style), any engine
"""
