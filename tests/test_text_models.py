"""Text models, the hf: bridge, transformer feature heads and every_kth for BERT students.

Everything runs offline on tiny networks; the hf: tests load a BERT the test itself saves
in the real Hugging Face on-disk format (config.json, model.safetensors, tokenizer files).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses import AttentionMSE, HiddenStateCosine, HiddenStateMSE, KLDivergence
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput
from kd_lightning.models import create_model, list_models, model_from_config
from kd_lightning.models.hf import HFTextClassifier
from kd_lightning.modules import DistillationModule, TeacherSpec
from kd_lightning.modules.features import FeatureTaps
from kd_lightning.modules.init_from_teacher import copy_from_teacher

VOCAB = 60
TINY_BERT = {"layers": 2, "hidden": 32, "heads": 2}
MODELS = {
    "bag_of_embeddings": {"embed_dim": 8},
    "bilstm": {"embed_dim": 12, "hidden_size": 6, "fc_dim": 10},
    "kim_cnn": {"embed_dim": 12, "filters": 4},
    "bert": TINY_BERT,
}
FEATURES = {
    "bag_of_embeddings": {"embedding": (3, 9, 8), "pool": (3, 8)},
    "bilstm": {"embedding": (3, 9, 12), "encoder": (3, 12), "hidden": (3, 10)},
    "kim_cnn": {"embedding": (3, 9, 12), "pool": (3, 12)},
    "bert": {"embeddings": (3, 9, 32), "hidden.1": (3, 9, 32), "attention.0": (3, 2, 9, 9),
             "pooler": (3, 32)},
}


def _text_model(name: str, num_classes: int = 3, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {**MODELS.get(name, {}), **kwargs}
    return create_model(name, num_classes, None, vocab_size=VOCAB, max_length=16, **kwargs).eval()


def _batch(lengths=(9, 4, 1), pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded token ids (pad 0) of the given lengths."""
    g = torch.Generator().manual_seed(1)
    width = pad_to or max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, VOCAB, (n,), generator=g)
    mask = (ids != 0).long()
    return {"input_ids": ids, "attention_mask": mask, "label": torch.tensor([0, 1, 2])}


def test_text_models_are_registered_with_text_inputs():
    assert set(MODELS) <= set(list_models("text"))
    for name in MODELS:
        model = _text_model(name)
        assert model.input_keys == ("input_ids", "attention_mask")
        assert model.feature_layers  # documented, hookable layer names


@pytest.mark.parametrize("name", sorted(MODELS))
def test_padding_does_not_change_a_samples_logits(name):
    model = _text_model(name)
    batch = _batch()
    logits = model(batch["input_ids"], batch["attention_mask"])
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    longer = _batch(pad_to=14)  # the same texts, five more padding positions each
    torch.testing.assert_close(model(longer["input_ids"], longer["attention_mask"]), logits,
                               rtol=1e-5, atol=1e-5)
    for row, n in enumerate((9, 4, 1)):  # each text alone, unpadded
        alone = model(batch["input_ids"][row:row + 1, :n], batch["attention_mask"][row:row + 1, :n])
        torch.testing.assert_close(alone[0], logits[row], rtol=1e-5, atol=1e-5)
    # and the padding is really ignored, not just the same zeros: other ids there change nothing
    noisy = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7)
    torch.testing.assert_close(model(noisy, batch["attention_mask"]), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_feature_layers_are_hookable(name):
    model = _text_model(name)
    taps = FeatureTaps(model, list(FEATURES[name]), "student_layers")
    batch = _batch()
    out = taps(batch["input_ids"], batch["attention_mask"])
    assert {k: tuple(v.shape) for k, v in out.features.items()} == FEATURES[name]
    assert set(FEATURES[name]) <= set(model.feature_layers)


def test_bert_attention_taps_are_probabilities_over_real_tokens():
    model = _text_model("bert")
    taps = FeatureTaps(model, ["attention.1"], "student_layers")
    batch = _batch()
    att = taps(batch["input_ids"], batch["attention_mask"]).features["attention.1"]
    assert model.model.config._attn_implementation == "eager"  # switched on by the hook
    torch.testing.assert_close(att.sum(-1), torch.ones(3, 2, 9))
    assert att[1, :, :, 4:].abs().max() < 1e-6  # no attention to sample 1's padding


def test_bert_size_kwargs_and_errors():
    model = _text_model("bert", layers=3, hidden=48, heads=4, intermediate=40)
    cfg = model.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (3, 48, 4)
    assert cfg.intermediate_size == 40 and cfg.vocab_size == VOCAB
    assert cfg.max_position_embeddings == 16 and len(model.hidden) == 3
    with pytest.raises(ConfigError, match="hidden must be a multiple of heads"):
        _text_model("bert", hidden=30, heads=4)
    with pytest.raises(ConfigError, match="kwarg filters must be >= 1"):
        _text_model("kim_cnn", filters=0)
    with pytest.raises(ConfigError, match="model.student_kwargs.*rejected"):
        model_from_config("bert", 2, {"vocab_size": VOCAB, "max_length": 16}, "model.student",
                          {"depth": 2})


# -- hf: -------------------------------------------------------------------------------
def _save_tiny_bert(path: Path, vocab: int = 40, layers: int = 2) -> Path:
    """A tiny BERT and its WordPiece tokenizer in Hugging Face's on-disk format."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                        num_labels=2)
    BertForSequenceClassification(config).save_pretrained(path)
    words = ["good", "bad", "film", "movie", "great", "awful", "plot", "the", "a", "is"]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokens += [f"##x{i}" for i in range(vocab - len(tokens))]
    (path / "vocab.txt").write_text("\n".join(tokens) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    return path


@pytest.fixture
def tiny_bert_dir(tmp_path) -> Path:
    return _save_tiny_bert(tmp_path / "tiny-bert")


def test_hf_local_directory_loads_the_saved_weights(tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    name = f"hf:{tiny_bert_dir}"
    model = create_model(name, 2, None, vocab_size=40, max_length=32, field="model.student").eval()
    assert isinstance(model, HFTextClassifier) and model.kd_name == name
    reference = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    enc = AutoTokenizer.from_pretrained(tiny_bert_dir)(
        ["the film is good", "awful plot"], padding=True, return_tensors="pt"
    )
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert mask[1].sum() < mask[0].sum()  # a padded row
    expected = reference(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(model(ids, mask), expected)
    assert "hidden.1" in model.feature_layers and "attention.1" in model.feature_layers

    # a new label count keeps the encoder and gets a fresh classifier
    five = create_model(name, 5, None, vocab_size=40, max_length=32)
    assert five.model.classifier.out_features == 5
    torch.testing.assert_close(five.model.bert.embeddings.word_embeddings.weight,
                               reference.bert.embeddings.word_embeddings.weight)

    # pretrained: false builds the architecture only, sized to the data's vocabulary
    blank = create_model(name, 2, None, vocab_size=50, max_length=32, pretrained=False)
    assert blank.vocab_size == 50 and blank.depth == 2
    assert not torch.equal(blank.model.bert.encoder.layer[0].attention.self.query.weight,
                           reference.bert.encoder.layer[0].attention.self.query.weight)


def test_hf_vocabulary_and_length_must_fit(tiny_bert_dir):
    with pytest.raises(ConfigError, match=r"model.student=.*40 tokens.*data.tokenizer.*"
                                          r"data.vocab_size <= 40"):
        create_model(f"hf:{tiny_bert_dir}", 2, None, vocab_size=8000, max_length=32,
                     field="model.student")
    with pytest.raises(ConfigError, match="data.max_length <= 32"):
        create_model(f"hf:{tiny_bert_dir}", 2, None, vocab_size=40, max_length=64)


def test_hf_offline_and_not_cached_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with pytest.raises(ConfigError) as err:
        create_model("hf:kd-lightning-tests/not-a-model", 2, None, vocab_size=100,
                     max_length=16, field="model.student")
    msg = str(err.value)
    assert msg.startswith("model.student='hf:kd-lightning-tests/not-a-model' is invalid")
    assert "not in the local Hugging Face cache" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"^model.teacher.model='hf:"):
        model_from_config("hf:kd-lightning-tests/not-a-model", 2,
                          {"vocab_size": 100, "max_length": 16}, "model.teacher.model", None)
    # a local folder without a model says so instead of trying the Hub
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="save one there with save_pretrained"):
        create_model(f"hf:{tmp_path / 'empty'}", 2, None, vocab_size=100, max_length=16)


# -- every_kth -------------------------------------------------------------------------
def _layer(model: nn.Module, i: int) -> nn.Module:
    return model.model.bert.encoder.layer[i]


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_kth_initialises_a_bert_student_from_every_other_layer():
    teacher = _text_model("bert", layers=4)
    student = _text_model("bert", layers=2)
    torch.manual_seed(1)
    report = copy_from_teacher(student, teacher, "every_kth", verbose=False)
    assert report.block_map == {"model.bert.encoder.layer.0": "model.bert.encoder.layer.0",
                                "model.bert.encoder.layer.1": "model.bert.encoder.layer.2"}
    assert _same(_layer(student, 1), _layer(teacher, 2)) and _same(_layer(student, 0), _layer(teacher, 0))
    for part in ("bert.embeddings", "bert.pooler", "classifier"):
        assert _same(student.model.get_submodule(part), teacher.model.get_submodule(part))
    assert report.fraction == 1.0 and not report.skipped


def test_every_kth_from_an_hf_teacher_skips_what_does_not_fit(tmp_path):
    path = _save_tiny_bert(tmp_path / "teacher4", layers=4)
    teacher = create_model(f"hf:{path}", 2, None, vocab_size=40, max_length=32)
    # a built-in bert student of the same width, 2 layers, its own (smaller) position table
    student = create_model("bert", 2, None, vocab_size=40, max_length=16, layers=2, hidden=32,
                           heads=2, intermediate=64)
    report = copy_from_teacher(student, teacher, "every_kth", verbose=False)
    assert _same(_layer(student, 1), _layer(teacher, 2))
    assert "shape (16, 32)" in report.skipped["model.bert.embeddings.position_embeddings.weight"]
    torch.testing.assert_close(student.model.classifier.weight, teacher.model.classifier.weight)
    assert 0.5 < report.fraction < 1.0


# -- transformer heads -----------------------------------------------------------------
def _outputs(features_s: dict, features_t: dict, classes: int = 2):
    n = next(iter(features_s.values())).shape[0]
    return ModelOutput(torch.zeros(n, classes), features_s), TeacherOutput(
        [ModelOutput(torch.zeros(n, classes), features_t)]
    )


def _mask(lengths, width):
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()


def test_hidden_state_mse_matches_a_hand_computation_with_projection_and_mask():
    torch.manual_seed(0)
    head = HiddenStateMSE(weight=1.0, layer_map=[[1, 3]])
    assert head.student_layers == ("hidden.1",) and head.teacher_layers == ("hidden.3",)
    head.build({"hidden.1": torch.Size([2, 5, 4])}, {"hidden.3": torch.Size([2, 5, 6])})
    proj = head.projections[0]
    assert isinstance(proj, nn.Linear) and proj.weight.shape == (6, 4)
    h_s = torch.randn(2, 5, 4, requires_grad=True)
    h_t = torch.randn(2, 5, 6)
    mask = _mask([5, 2], 5)
    s, t = _outputs({"hidden.1": h_s}, {"hidden.3": h_t})
    loss = head(s, t, {"attention_mask": mask})

    # by hand: squared error over the 7 real tokens × 6 dims, averaged
    diff = h_s @ proj.weight.T + proj.bias - h_t
    ref = sum((diff[b, i] ** 2).sum() for b in range(2) for i in range(5) if mask[b, i]) / (7 * 6)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert h_s.grad[1, 2:].abs().max() == 0  # padding receives no gradient
    assert h_s.grad[1, :2].abs().min() > 0
    assert proj.weight.grad.norm() > 0

    # the padding's content is irrelevant
    h_t2 = h_t.clone()
    h_t2[1, 2:] = 1e6
    torch.testing.assert_close(head(s, _outputs({"hidden.1": h_s}, {"hidden.3": h_t2})[1],
                                    {"attention_mask": mask}), loss)


def test_hidden_state_mse_same_width_needs_no_projection_and_handles_pooled_vectors():
    head = HiddenStateMSE(student_layers=["pooler"], teacher_layers=["pooler"])
    head.build({"pooler": torch.Size([3, 4])}, {"pooler": torch.Size([3, 4])})
    assert isinstance(head.projections[0], nn.Identity)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    s, t = _outputs({"pooler": a}, {"pooler": b})
    torch.testing.assert_close(head(s, t, {"attention_mask": _mask([1, 1, 1], 1)}), F.mse_loss(a, b))


def test_attention_mse_matches_a_hand_computation_over_real_query_key_pairs():
    torch.manual_seed(0)
    head = AttentionMSE(layer_map=[[0, 1]])
    assert head.student_layers == ("attention.0",) and head.teacher_layers == ("attention.1",)
    head.build({"attention.0": torch.Size([2, 2, 4, 4])}, {"attention.1": torch.Size([2, 2, 4, 4])})
    a_s = torch.softmax(torch.randn(2, 2, 4, 4), -1).requires_grad_()
    a_t = torch.softmax(torch.randn(2, 2, 4, 4), -1)
    mask = _mask([4, 3], 4)
    s, t = _outputs({"attention.0": a_s}, {"attention.1": a_t})
    loss = head(s, t, {"attention_mask": mask})
    terms = [(a_s[b, h, i, j] - a_t[b, h, i, j]) ** 2 for b in range(2) for h in range(2)
             for i in range(4) for j in range(4) if mask[b, i] and mask[b, j]]
    torch.testing.assert_close(loss, sum(terms) / len(terms))  # (16 + 9) pairs × 2 heads
    assert len(terms) == 50
    loss.backward()
    assert a_s.grad[1, :, 3].abs().max() == 0 and a_s.grad[1, :, :, 3].abs().max() == 0

    # different head counts: both sides averaged over heads
    head = AttentionMSE(layer_map=[[0, 0]])
    head.build({"attention.0": torch.Size([2, 1, 4, 4])}, {"attention.0": torch.Size([2, 2, 4, 4])})
    one = a_t.mean(1, keepdim=True)
    s, t = _outputs({"attention.0": one}, {"attention.0": a_t})
    assert head(s, t, {"attention_mask": mask}).abs() < 1e-7


def test_hidden_state_cosine_matches_a_hand_computation():
    torch.manual_seed(0)
    head = HiddenStateCosine(layer_map=[[1, 3]])
    head.build({"hidden.1": torch.Size([2, 3, 4])}, {"hidden.3": torch.Size([2, 3, 4])})
    h_s = torch.randn(2, 3, 4, requires_grad=True)
    h_t = torch.randn(2, 3, 4)
    mask = _mask([3, 1], 3)
    s, t = _outputs({"hidden.1": h_s}, {"hidden.3": h_t})
    loss = head(s, t, {"attention_mask": mask})
    cos = [(h_s[b, i] @ h_t[b, i]) / (h_s[b, i].norm() * h_t[b, i].norm())
           for b in range(2) for i in range(3) if mask[b, i]]
    torch.testing.assert_close(loss, sum(1 - c for c in cos) / 4)
    loss.backward()
    assert h_s.grad[1, 1:].abs().max() == 0
    # scale-invariant: a student state twice as long costs the same
    s2, _ = _outputs({"hidden.1": 2 * h_s.detach()}, {"hidden.3": h_t})
    torch.testing.assert_close(head(s2, t, {"attention_mask": mask}), loss.detach())
    with pytest.raises(ConfigError, match="HiddenStateCosine.student_layers.*HiddenStateMSE"):
        head.build({"hidden.1": torch.Size([2, 3, 4])}, {"hidden.3": torch.Size([2, 3, 8])})


def test_head_arguments_are_checked():
    with pytest.raises(ConfigError, match="HiddenStateMSE.layer_map"):
        HiddenStateMSE(layer_map=[[0, 1, 2]])
    with pytest.raises(ConfigError, match="AttentionMSE.layer_map"):
        AttentionMSE(layer_map=[[0, -1]])
    with pytest.raises(ConfigError, match="HiddenStateCosine.layer_map.*not both"):
        HiddenStateCosine(layer_map=[[0, 1]], student_layers=["hidden.0"], teacher_layers=["x"])
    with pytest.raises(ConfigError, match="HiddenStateMSE.layer_map"):
        HiddenStateMSE()
    head = HiddenStateMSE(layer_map=[["embeddings", "embeddings"], [0, 1]])
    assert head.layer_pairs == [("embeddings", "embeddings"), ("hidden.0", "hidden.1")]
    # a second tokenization for the student: token-level matching makes no sense
    head.build({"embeddings": torch.Size([1, 2, 4]), "hidden.0": torch.Size([1, 2, 4])},
               {"embeddings": torch.Size([1, 2, 4]), "hidden.1": torch.Size([1, 2, 4])})
    feats = {"embeddings": torch.zeros(1, 2, 4), "hidden.0": torch.zeros(1, 2, 4)}
    s, t = _outputs(feats, {"embeddings": torch.zeros(1, 2, 4), "hidden.1": torch.zeros(1, 2, 4)})
    with pytest.raises(ConfigError, match="same tokens"):
        head(s, t, {"attention_mask": _mask([2], 2), "student_attention_mask": _mask([2], 2)})


def _teacher_state(tmp_path: Path, layers: int = 2) -> Path:
    path = tmp_path / "bert_teacher.pt"
    torch.save(_text_model("bert", num_classes=2, layers=layers).state_dict(), path)
    return path


def test_distillation_module_with_transformer_heads_on_a_bert_pair(tmp_path):
    weights = _teacher_state(tmp_path, layers=4)
    module = DistillationModule(
        student="bert", student_kwargs={"layers": 2, "hidden": 16, "heads": 2},
        teacher=TeacherSpec(model="bert", model_kwargs={**TINY_BERT, "layers": 4}, allow_untrained=True,
                            weights=str(weights)),
        input_shape=(16,), num_classes=2, vocab_sizes={"input_ids": VOCAB},
        heads=[KLDivergence(1.0, temperature=2.0), HiddenStateMSE(1.0, layer_map=[[0, 1], [1, 3]]),
               AttentionMSE(1.0, layer_map=[[1, 3]])],
    )
    mse = module.heads[1]
    assert [p.weight.shape for p in mse.projections] == [(32, 16), (32, 16)]
    batch = _batch(pad_to=12)
    batch["label"] = torch.tensor([0, 1, 1])
    student = module._student_taps(batch["input_ids"], batch["attention_mask"])
    teacher = module.teacher_forward(batch)
    assert set(student.features) == {"hidden.0", "hidden.1", "attention.1"}
    losses = [h(student, teacher, batch) for h in module.heads]
    assert all(torch.isfinite(v) and v > 0 for v in losses)
    sum(losses).backward()
    assert mse.projections[0].weight.grad is not None
    assert module.student.model.bert.encoder.layer[0].attention.self.query.weight.grad is not None


def test_a_layer_map_past_the_students_depth_is_a_config_error(tmp_path):
    weights = _teacher_state(tmp_path)
    with pytest.raises(ConfigError, match=r"student_layers='hidden.2'.*hidden.1"):
        DistillationModule(
            student="bert", student_kwargs=TINY_BERT,
            teacher=TeacherSpec(model="bert", model_kwargs=TINY_BERT, weights=str(weights)),
            input_shape=(16,), num_classes=2, vocab_sizes={"input_ids": VOCAB},
            heads=[HiddenStateMSE(1.0, layer_map=[[2, 1]])],
        )
