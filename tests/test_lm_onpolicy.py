"""On-policy / mixed (GKD λ) training: generation, EOS/padding handling, token accounting."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.data import DataLoader

from kd_lightning.errors import ConfigError
from kd_lightning.losses.lm import TokenDivergence
from kd_lightning.modules.lm_distillation import (
    LMDistillationModule,
    OnPolicySpec,
    completion_mask,
    left_padded_prompts,
    pack_sequences,
)
from kd_lightning.modules.teacher import TeacherSpec
from tests.test_lm_module import TINY, V, _split, _trainer, _window


def test_completion_mask_keeps_the_first_eos_and_drops_what_follows():
    eos = 2  # pad == eos: generate pads finished rows with EOS too
    generated = torch.tensor([[5, 6, 2, 2, 2], [2, 2, 2, 2, 2], [7, 8, 9, 10, 11], [4, 2, 9, 2, 2]])
    mask = completion_mask(generated, eos)
    assert mask.tolist() == [
        [True, True, True, False, False],  # completion + its EOS
        [True, False, False, False, False],  # an immediate EOS is a one-token completion
        [True] * 5,  # never stopped: all max_new_tokens count
        [True, True, False, False, False],  # a token after EOS is not part of it
    ]


def test_prompts_are_left_padded_and_sequences_repacked_right_padded():
    batch = _window()  # right-padded dataset layout: prompt, completion (labels), pad
    batch["attention_mask"][1, 20:] = 0
    batch["labels"][1, 20:] = -100
    batch["labels"][1, 18:20] = batch["input_ids"][1, 18:20]
    ids, attention = left_padded_prompts(batch, pad_id=0)
    assert ids.shape == (8, 22)  # the longest prompt (row 4); row 1 now ends in padding
    for i, n in enumerate([4, 18, 21, 12, 22, 17, 9, 19]):
        assert attention[i].sum() == n and attention[i, -n:].all()  # pads on the left
        assert torch.equal(ids[i, -n:], batch["input_ids"][i, :n])
    packed = pack_sequences([batch["input_ids"][0, :4]], [torch.tensor([9, 9, 2])], pad_id=0)
    assert packed["labels"].tolist() == [[-100] * 4 + [9, 9, 2]]
    assert packed["attention_mask"].tolist() == [[1] * 7]


def _module(lmbda=1.0, **kwargs):
    torch.manual_seed(0)
    return LMDistillationModule(
        "llama",
        TINY,
        TeacherSpec(
            model="llama", model_kwargs={**TINY, "num_hidden_layers": 1}, allow_untrained=True
        ),
        heads=[TokenDivergence(1.0, "jsd", beta=0.5)],
        num_classes=V,
        generate_samples=0,
        on_policy=OnPolicySpec(lmbda=lmbda, temperature=0.0, max_new_tokens=6, **kwargs),
        optimizer=functools.partial(torch.optim.SGD, lr=1.0),
    )


def test_batched_left_padded_generation_equals_one_prompt_at_a_time():
    module = _module()
    module.student.double()  # float64: batched and single-row greedy picks cannot tie-break apart
    batch = _window()
    together = module.generate_completions(batch)
    module.on_policy.generation_batch_size = 1  # no padding at all
    alone = module.generate_completions(batch)
    module.on_policy.generation_batch_size = 3  # chunks decoupled from the micro-batch
    chunked = module.generate_completions(batch)
    for key in together:
        assert torch.equal(together[key], alone[key]) and torch.equal(chunked[key], alone[key])
    # the prompts are kept, only generated tokens carry labels
    for i, n in enumerate([4, 23, 21, 12, 22, 17, 9, 19]):
        assert torch.equal(together["input_ids"][i, :n], batch["input_ids"][i, :n])
        assert (together["labels"][i, :n] == -100).all()
        assert 1 <= (together["labels"][i] != -100).sum() <= 6


def _on_policy_update(tmp_path, parts):
    module = _module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = _trainer(tmp_path, max_steps=1, accumulate_grad_batches=parts, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(_split(_window(), parts), batch_size=None))
    return {k: before[k] - v for k, v in module.state_dict().items()}


def test_on_policy_step_is_normalised_by_the_generated_tokens(tmp_path):
    whole, halves = _on_policy_update(tmp_path, 1), _on_policy_update(tmp_path, 2)
    for k in whole:
        torch.testing.assert_close(halves[k], whole[k], rtol=1e-4, atol=1e-7)
    # by hand: Σ JSD over the student's own completion tokens / their count
    module = _module()
    generated = module.generate_completions(_window())
    n = (generated["labels"][:, 1:] != -100).sum()
    assert n != (_window()["labels"][:, 1:] != -100).sum()  # the dataset's count differs
    student = module.lm_output(module.student, generated, hidden=False)
    (module.heads[0](student, module.teacher_output(generated), generated) / n).backward()
    for name, p in module.named_parameters():
        torch.testing.assert_close(whole[name], p.grad, rtol=1e-4, atol=1e-7)


def test_lambda_draw_is_seeded_and_mixes():
    a, b, c = OnPolicySpec(0.5, seed=3), OnPolicySpec(0.5, seed=3), OnPolicySpec(0.5, seed=4)
    draws = [a.draw(e, i) for e in range(2) for i in range(100)]
    assert draws == [b.draw(e, i) for e in range(2) for i in range(100)]
    assert draws != [c.draw(e, i) for e in range(2) for i in range(100)]
    assert 0.35 < sum(draws) / len(draws) < 0.65
    assert not any(OnPolicySpec(0.0).draw(0, i) for i in range(20))
    assert all(OnPolicySpec(1.0).draw(0, i) for i in range(20))
    with pytest.raises(ConfigError, match="lmbda"):
        _module(lmbda=1.5)
