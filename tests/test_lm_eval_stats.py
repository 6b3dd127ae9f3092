"""Generation statistics of the LM test step (kd_lightning/modules/lm_eval_stats.py),
on hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.modules.lm_eval_stats import (
    distinct_n,
    exposure_bias,
    mean_length,
    position_means,
    step_kl,
    words,
)


def test_distinct_n_pools_ngrams_over_completions_never_across_them():
    completions = [["a", "b", "a"], ["a", "b"]]
    # unigrams a b a a b: 2 distinct of 5; bigrams (a b) (b a) (a b): 2 of 3, and the
    # boundary pair (a, a) between the completions is not a bigram of either
    assert distinct_n(completions, 1) == pytest.approx(2 / 5)
    assert distinct_n(completions, 2) == pytest.approx(2 / 3)
    assert distinct_n([["x"], []], 2) is None  # no bigram at all
    assert words(["the  film\nis good", ""]) == [["the", "film", "is", "good"], []]
    with pytest.raises(ValueError):
        distinct_n(completions, 0)


def test_mean_length_counts_tokens_per_completion():
    assert mean_length([[1, 2, 3], [4], []]) == pytest.approx(4 / 3)
    assert mean_length([]) is None


def test_step_kl_is_kl_teacher_to_student_per_row():
    teacher = torch.tensor([[0.5, 0.5], [0.9, 0.1]]).log()
    student = torch.tensor([[0.25, 0.75], [0.9, 0.1]]).log()
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert step_kl(teacher, student).tolist() == pytest.approx([expected, 0.0], abs=1e-6)


def test_exposure_bias_is_excess_accumulated_regret_over_teacher_forced_error():
    # student-prefix KL per position: t1 mean(1, 2) = 1.5, t2 only the first: 3.0
    student = [torch.tensor([1.0, 3.0]), torch.tensor([2.0])]
    teacher = [torch.tensor([1.0, 1.0, 5.0])]  # teacher-prefix KL: 1, 1, 5
    assert position_means(student).tolist() == [1.5, 3.0]
    out = exposure_bias(student, teacher)
    # l = 2 (the longest both reach): R(2) = 1.5 + 3 = 4.5, eps(2) = (1 + 1) / 2 = 1,
    # ExAccErr = (4.5 - 2 * 1) / (2 * 1) = 125 %
    assert out == pytest.approx(
        {"exposure_bias": 125.0, "regret": 4.5, "step_error": 1.0, "length": 2.0}
    )
    assert exposure_bias(student, teacher, length=1)["exposure_bias"] == pytest.approx(50.0)
    # no accumulation: the same error on either prefix is no excess error
    same = [torch.tensor([0.5, 0.5])]
    assert exposure_bias(same, same)["exposure_bias"] == pytest.approx(0.0)
    assert exposure_bias([torch.zeros(2)], [torch.zeros(2)]) is None  # student = teacher
    assert exposure_bias([torch.zeros(0)], teacher) is None  # the student stopped at once
