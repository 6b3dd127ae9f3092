from pathlib import Path


def test_teacher_fixture_writes_checkpoint(mnist_teacher_ckpt: Path):
    assert mnist_teacher_ckpt.is_file()
    assert mnist_teacher_ckpt.stat().st_size > 10_000
