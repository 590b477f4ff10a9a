import pytest
import torch

from bitalloc.data import default_text, load_text, tokenize, windows
from bitalloc.errors import BitallocError


def test_default_splits_are_disjoint_and_fixed():
    a, b = default_text(), default_text()
    assert a == b
    cal_topics = set(a.calibration.split("\n\n"))
    eval_topics = set(a.evaluation.split("\n\n"))
    assert len(a.calibration) > len(a.evaluation) > 0
    # No paragraph appears in both splits (topics repeat paragraphs; they are de-duplicated).
    shared = {p.strip() for p in cal_topics} & {p.strip() for p in eval_topics} - {""}
    assert not shared


def test_windows_are_non_overlapping_and_spread():
    ids = torch.arange(1000)
    all_w = windows(ids, 100)
    assert all_w.shape == (10, 100)
    few = windows(ids, 100, max_tokens=300)
    assert few.shape == (3, 100)
    starts = [int(w[0]) for w in few]
    assert starts == [0, 300, 600]


def test_short_text_raises():
    with pytest.raises(BitallocError, match="fewer than one sequence"):
        windows(torch.arange(10), 512)


def test_text_files_and_errors(tmp_path, byte_tokenizer):
    cal = tmp_path / "c.txt"
    cal.write_text("hello world")
    splits = load_text(cal, None)
    assert splits.calibration == "hello world"
    assert splits.evaluation == default_text().evaluation
    assert tokenize(byte_tokenizer, "ab").tolist() == [97, 98]
    with pytest.raises(BitallocError, match="both calibration and evaluation"):
        load_text(cal, cal)
    with pytest.raises(BitallocError, match="does not exist"):
        load_text(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(BitallocError, match="UTF-8"):
        load_text(bad)
