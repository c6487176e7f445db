"""Fitting the rejection predictor from real draft/target traces (numpy only; the target traces come in).

Given prompts and the target's greedy continuation of each, the draft is run teacher-forced over prompt +
continuation in one forward pass; at every continuation position we record the draft's confidence features and
whether its greedy choice equals the target's token. `predictor.simulate_rounds` turns that into the rows a
drafting session would see, and a logistic regression is fitted on them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wisp_sdk.bundle import load_manifest, save_manifest
from wisp_sdk.draft_runner import DraftRunner
from wisp_sdk.predictor import FEATURES, RejectionPredictor, simulate_rounds
from wisp_sdk.sampling import entropy, softmax

DEFAULT_PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Implement binary search over a sorted list in Python and explain its complexity.",
    "Write a function that reverses a singly linked list.",
    "Explain the difference between a process and a thread.",
    "Write a Python class for a stack with push, pop and peek.",
    "Write a SQL query that returns the ten customers with the highest total order value.",
    "Write a bash script that counts the lines of every .py file in a folder.",
    "Explain what a hash map is and how collisions are handled.",
    "Write a JavaScript function that debounces another function.",
    "Write quicksort in Python.",
    "What is the difference between a list and a tuple in Python?",
    "Write a function that parses a CSV line, handling quoted fields.",
    "Explain recursion with a short example.",
    "Write a Rust function that returns the largest element of a slice.",
    "Write a Python generator that yields Fibonacci numbers.",
    "How do I read a JSON file in Python and print one field?",
]


def trace_features(
    runner: DraftRunner, prompt_ids: list[int], continuation: list[int]
) -> tuple[np.ndarray, ...]:
    """Per continuation position: the draft's top-1 probability, entropy, and agreement with the target."""
    if not continuation:
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=bool)
    seq = list(prompt_ids) + list(continuation)
    logits = runner.teacher_forced_logits(seq[:-1])
    start = len(prompt_ids) - 1
    top1, ent, agree = [], [], []
    for j, tok in enumerate(continuation):
        p = softmax(logits[start + j])
        top1.append(float(p.max()))
        ent.append(entropy(p))
        agree.append(int(np.argmax(p)) == tok)
    return np.array(top1), np.array(ent), np.array(agree)


def fit_from_traces(
    runner: DraftRunner, prompts: list[list[int]], continuations: list[list[int]], max_k: int = 8
) -> tuple[RejectionPredictor, dict]:
    xs, ys = [], []
    agree_all = []
    for ids, cont in zip(prompts, continuations, strict=True):
        top1, ent, agree = trace_features(runner, ids, cont)
        if len(agree) == 0:
            continue
        x, y = simulate_rounds(top1, ent, agree, max_k=max_k)
        xs.append(x)
        ys.append(y)
        agree_all.append(agree)
    if not xs:
        raise ValueError("no training rows: every target continuation was empty")
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    pred = RejectionPredictor.fit(x, y)
    report = {
        "rows": int(len(y)),
        "prompts": len(prompts),
        "greedy_agreement": float(np.concatenate(agree_all).mean()),
        "accept_rate_in_rounds": float(y.mean()),
        "accuracy": pred.meta["accuracy"],
        "log_loss": pred.meta["log_loss"],
        "weights": dict(zip(FEATURES, [round(float(w), 4) for w in pred.weights], strict=True)),
        "bias": round(pred.bias, 4),
    }
    pred.meta.update({"prompts": len(prompts), "greedy_agreement": report["greedy_agreement"]})
    return pred, report


def store_predictor(bundle_dir: str | Path, predictor: RejectionPredictor) -> Path:
    manifest = load_manifest(bundle_dir)
    manifest.predictor = predictor.to_dict()
    return save_manifest(bundle_dir, manifest)
