"""DistiLLM's adaptive off-policy schedule and replay buffer, against the authors' arithmetic
(jongwooko/distillm@d47e77ff9d27721783b32213be38c1204230cc0a finetune.py L291-L323 and
L412-L417), written out here."""

from __future__ import annotations

import functools
import itertools

import torch
from torch.utils.data import DataLoader

from kd_lightning.losses.lm import TokenDivergence
from kd_lightning.modules.lm_distillation import (
    LMDistillationModule,
    OnPolicySpec,
    adaptive_action,
    adaptive_threshold_update,
)
from kd_lightning.modules.teacher import TeacherSpec
from tests.test_lm_module import TINY, V, _split, _trainer, _window


def _theirs(r, adaptive_threshold, global_step, total_iters, buffered, capacity, replay_ratio):
    if replay_ratio == "constant":
        samp_threshold = adaptive_threshold * 0.5
    elif replay_ratio == "increasing":
        samp_threshold = adaptive_threshold * global_step / total_iters
    else:
        samp_threshold = adaptive_threshold * (1 - global_step / total_iters)
    if r < samp_threshold or (r < adaptive_threshold and buffered < capacity):
        return "generate"  # student_generator.run_sample, then into the buffer
    if r < adaptive_threshold:
        return "replay"  # replay_buffer.sample()
    return "dataset"


def test_adaptive_choice_matches_distillm():
    grid = itertools.product(
        [0.05, 0.3, 0.6, 0.95],  # r
        [0.0, 0.2, 0.5, 1.0],  # threshold
        [0, 3, 9],  # step of 10
        [0, 5, 8],  # buffered rows (capacity 8)
        ["decreasing", "constant", "increasing"],
    )
    for r, p, step, buffered, ratio in grid:
        assert adaptive_action(r, p, step, 10, buffered, 8, ratio) == _theirs(
            r, p, step, 10, buffered, 8, ratio
        ), (r, p, step, buffered, ratio)


def test_threshold_rises_as_distillm_after_evaluations():
    losses = [3.0, 3.05, 3.2, 3.1, 3.35, 3.5, 3.61, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
    # theirs: prev_avg_loss from an evaluation before training, then after each evaluation
    threshold, prev = 0.0, losses[0]
    expected = []
    for curr in losses[1:]:
        if curr >= prev + 0.1:
            threshold = min(threshold + 0.1, 1.0)
            prev = curr
        expected.append(threshold)
    ours, previous, got = 0.0, None, []
    for curr in losses:
        ours, previous = adaptive_threshold_update(ours, previous, curr, 0.1)
        got.append(ours)
    assert got[1:] == expected and got[0] == 0.0 and max(got) == 1.0


def test_adaptive_schedule_generates_into_the_buffer_then_replays(tmp_path):
    torch.manual_seed(0)
    spec = OnPolicySpec(
        temperature=0.0, max_new_tokens=4, schedule="adaptive", init_threshold=1.0, capacity=4
    )
    module = LMDistillationModule(
        "llama",
        TINY,
        TeacherSpec(model="llama", model_kwargs=TINY, allow_untrained=True),
        heads=[TokenDivergence(1.0, "jsd")],
        num_classes=V,
        generate_samples=0,
        on_policy=spec,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
    )
    actions = []
    choose = module.policy_action
    module.policy_action = lambda i: actions.append(choose(i)) or actions[-1]
    data = DataLoader(_split(_window(), 2) * 3, batch_size=None)  # 6 batches of 4 rows
    _trainer(tmp_path, max_steps=6, limit_val_batches=0).fit(module, train_dataloaders=data)
    assert actions[0] == "generate" and "replay" in actions and "dataset" not in actions
    assert len(module._replay) == 4  # capacity: the oldest rows left
    prompt, completion = module._replay[0]
    assert 1 <= len(completion) <= 4 and len(prompt) >= 4
