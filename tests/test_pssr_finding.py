"""`advmend pssr-analysis`'s verdict rests on a paired test over the same examples: constructed cases
with a known answer (a gap inside the bootstrap interval is "no measurable difference")."""

from __future__ import annotations

import pytest
import torch

from advmend.study.pssr_analysis import finding_verdict, paired_difference


def _correct(n: int, ones: list[int]) -> torch.Tensor:
    t = torch.zeros(n, dtype=torch.bool)
    t[ones] = True
    return t


def test_a_small_gap_on_few_examples_is_no_measurable_difference():
    # 33.5 % vs 31.0 % on 200 examples (the case): 5 examples apart, the rest shuffled pairs
    g = torch.Generator().manual_seed(0)
    salient = torch.randperm(200, generator=g)[:67]
    random = torch.randperm(200, generator=g)[:62]
    verdict, d = finding_verdict(_correct(200, salient.tolist()), _correct(200, random.tolist()))
    assert d["difference"] == pytest.approx(2.5) and d["covers_zero"]
    assert verdict.startswith("no measurable difference")


def test_a_consistent_paired_gap_is_a_finding_either_way():
    base = list(range(40))
    better = _correct(200, base + list(range(40, 70)))  # 30 more examples right, never fewer
    verdict, d = finding_verdict(better, _correct(200, base))
    assert d["difference"] == pytest.approx(15.0) and d["ci95"][0] > 0
    assert verdict.startswith("removing the salient part helps more")
    verdict, d = finding_verdict(_correct(200, base), better)
    assert d["ci95"][1] < 0 and "NOT reproduced" in verdict


def test_identical_vectors_differ_by_exactly_zero_and_shapes_are_checked():
    a = _correct(50, [1, 2, 3])
    d = paired_difference(a, a.clone())
    assert d["difference"] == 0 and d["ci95"] == [0.0, 0.0] and d["covers_zero"]
    with pytest.raises(ValueError):
        paired_difference(a, a[:10])
