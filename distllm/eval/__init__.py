"""Downstream evaluation: multiple-choice task files and their scoring, and the contamination check.

    tasks.py            task files (JSONL) -> Task / Item, with the field names of the common sets
    multiple_choice.py  lm-evaluation-harness 0.4 ``multiple_choice`` scoring, batched, KV-cached, data-parallel
    contamination.py    GPT-3 appendix C n-gram overlap of task items with the prepared training shards
    progress.py         a progress bar with ETA (plain lines when stderr is not a terminal)
"""
