"""Result files carry their command, commit, config hashes and machine; a changed config shows."""

from __future__ import annotations

import json

from kd_lightning.provenance import config_hash, provenance, stale_configs


def test_provenance_records_command_commit_configs_and_machine(tmp_path):
    cfg = tmp_path / "a.yaml"
    cfg.write_text("trainer: {max_epochs: 1}\n")
    record = provenance(["kd-lightning", "fit", "-c", str(cfg)], [cfg], {"b": 1, "a": 2})
    assert record["command"].startswith("kd-lightning fit -c ")
    assert len(record["git_commit"]) == 40 or record["git_commit"] == "unknown"
    assert record["machine"]["nproc"]
    # a config outside the checkout is named, never by its machine path
    assert list(record["config_files"]) == ["a.yaml"]
    assert record["resolved_config_sha256"] == config_hash({"a": 2, "b": 1})
    json.dumps(record)  # the record goes into JSON result files as it is


def test_stale_configs_names_edited_and_missing_files(tmp_path):
    (tmp_path / "a.yaml").write_text("x: 1\n")
    (tmp_path / "b.yaml").write_text("y: 1\n")
    record = provenance("cmd", [tmp_path / "a.yaml", tmp_path / "b.yaml"])
    assert stale_configs(record, root=tmp_path) == []
    (tmp_path / "a.yaml").write_text("x: 2\n")
    (tmp_path / "b.yaml").unlink()
    assert stale_configs(record, root=tmp_path) == ["a.yaml", "b.yaml"]


def test_config_hash_ignores_key_order_not_values():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
