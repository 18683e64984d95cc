"""Checkpoint checksum manifests: a torn or altered file is detected, never loaded."""

from __future__ import annotations

import pytest

from zerotrain.service.runtime.worker import CheckpointCorrupted, _write_checksums, verify_checksums


def make_checkpoint(root):
    """Two ranks' parts merged into one directory, as Ray Train V2 does."""
    checkpoint = root / "checkpoint_00000010"
    (checkpoint / "optimizer").mkdir(parents=True)
    (checkpoint / "model.pt").write_bytes(b"model" * 100)
    (checkpoint / "optimizer" / "shard-0.pt").write_bytes(b"a" * 64)
    _write_checksums(checkpoint, 0)
    rank1 = root / "rank1"
    (rank1 / "optimizer").mkdir(parents=True)
    (rank1 / "optimizer" / "shard-1.pt").write_bytes(b"b" * 64)
    _write_checksums(rank1, 1)
    for path in rank1.rglob("*"):
        if path.is_file():
            target = checkpoint / path.relative_to(rank1)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return checkpoint


def test_intact_checkpoint_verifies(tmp_path):
    verify_checksums(make_checkpoint(tmp_path))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda c: (c / "model.pt").write_bytes(b"model" * 50), "model.pt is corrupted"),
        (
            lambda c: (c / "optimizer" / "shard-1.pt").write_bytes(b"c" * 64),
            "shard-1.pt is corrupted",
        ),
        (lambda c: (c / "optimizer" / "shard-0.pt").unlink(), "shard-0.pt is missing"),
        (lambda c: (c / "checksums" / "rank-1.json").write_text("{"), "unreadable manifest"),
    ],
)
def test_damage_is_detected(tmp_path, damage, message):
    checkpoint = make_checkpoint(tmp_path)
    damage(checkpoint)
    with pytest.raises(CheckpointCorrupted, match=message):
        verify_checksums(checkpoint)


def test_missing_manifest(tmp_path):
    (tmp_path / "checkpoint_00000001").mkdir()
    with pytest.raises(CheckpointCorrupted, match="no checksum manifest"):
        verify_checksums(tmp_path / "checkpoint_00000001")
