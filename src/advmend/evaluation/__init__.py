"""Robustness evaluation: per-example worst case over a protocol's attacks, reports."""

from advmend.evaluation.evaluate import AttackResult, EvalResult, evaluate

__all__ = ["AttackResult", "EvalResult", "evaluate"]
