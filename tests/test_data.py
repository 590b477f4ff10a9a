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


# --- Window protocol: every window starts the way the tokenizer starts a text ---------------

BOS, EOS = 1, 2
WORDS = ["<unk>", "<bos>", "<eos>", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"]
WORDS += [".", "The"]
STREAM_TEXT = "the quick brown fox jumps over the lazy dog . " * 30


def _old_windows(ids: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    # The cut before windows gained a prefix, kept here to prove an empty prefix changes nothing.
    available = ids.numel() // seq_len
    wanted = available if max_tokens is None else max(1, min(available, max_tokens // seq_len))
    picks = sorted({(i * available) // wanted for i in range(wanted)})
    return torch.stack([ids[p * seq_len : (p + 1) * seq_len] for p in picks])


def _word_tokenizer(template: str | None):
    """An offline Hugging Face fast tokenizer over WORDS; ``template`` is the post-processor's
    single-text template (e.g. ``"<bos> $A"``), None for none (it then adds nothing)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if template is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[("<bos>", BOS), ("<eos>", EOS)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def _prepared(tokenizer, seq_len: int):
    from bitalloc.data import TextSplits
    from bitalloc.models import LoadedModel
    from bitalloc.stages.prepare import Prepared

    text = TextSplits(calibration=STREAM_TEXT, evaluation=STREAM_TEXT[::-1], source="test")
    return Prepared(LoadedModel(None, tokenizer, "test"), [], (), text, seq_len)


def test_empty_prefix_windows_are_the_old_cut():
    ids = torch.arange(1000) * 7 % 251
    for seq_len, cap in [(100, None), (100, 300), (64, 5), (64, 640), (7, 100), (1000, None)]:
        old = _old_windows(ids, seq_len, cap)
        for new in (windows(ids, seq_len, cap), windows(ids, seq_len, cap, prefix=())):
            assert new.dtype == old.dtype and torch.equal(new, old)


def test_prefix_starts_every_window_and_counts_in_seq_len():
    ids = torch.arange(100, 1100)
    got = windows(ids, 100, prefix=(BOS,))
    # 1000 text tokens in chunks of 99: 10 windows, each BOS then the next 99 tokens.
    assert got.shape == (10, 100) and got.dtype == torch.long
    assert got[:, 0].tolist() == [BOS] * 10
    assert torch.equal(got[:, 1:].reshape(-1), ids[: 10 * 99])
    # The token cap counts whole windows, prefix included; picks stay evenly spread.
    few = windows(ids, 100, max_tokens=300, prefix=(BOS,))
    assert few.shape == (3, 100)
    assert [int(w[1]) for w in few] == [100 + 99 * p for p in (0, 3, 6)]
    two = windows(ids, 10, prefix=(5, 6))
    assert two.shape == (125, 10) and two[:, :2].tolist() == [[5, 6]] * 125


def test_prefix_errors():
    with pytest.raises(BitallocError, match="leaves no room for text"):
        windows(torch.arange(100), 1, prefix=(BOS,))
    with pytest.raises(BitallocError, match="leaves no room for text"):
        windows(torch.arange(100), 2, prefix=(BOS, BOS))
    with pytest.raises(BitallocError, match="positive"):
        windows(torch.arange(100), 0, prefix=(BOS,))
    # 99 tokens fill one window of 100 without a prefix but not with one: the error says so.
    assert windows(torch.arange(100), 100).shape == (1, 100)
    with pytest.raises(BitallocError, match=r"fewer than one sequence of 100 \(99 text tokens"):
        windows(torch.arange(98), 100, prefix=(BOS,))


def test_text_prefix_follows_what_the_tokenizer_does(byte_tokenizer):
    from bitalloc.data import text_prefix

    assert text_prefix(_word_tokenizer(None)) == ()
    assert text_prefix(_word_tokenizer("<bos> $A")) == (BOS,)
    # An EOS appended after the text is not part of a window's start.
    assert text_prefix(_word_tokenizer("<bos> $A <eos>")) == (BOS,)
    assert text_prefix(_word_tokenizer("$A <eos>")) == ()
    assert text_prefix(byte_tokenizer) == ()


def test_text_prefix_errors():
    from bitalloc.data import text_prefix

    class Empty:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [BOS] if add_special_tokens else []}

    class Rewrites:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [BOS, 9, 9] if add_special_tokens else [3, 4]}

    with pytest.raises(BitallocError, match="into no tokens"):
        text_prefix(Empty())
    with pytest.raises(BitallocError, match="cannot be told apart"):
        text_prefix(Rewrites())


def test_prepared_windows_start_with_bos():
    tok = _word_tokenizer("<bos> $A <eos>")
    prep = _prepared(tok, 16)
    text_ids = tokenize(tok, STREAM_TEXT)
    cal = prep.calibration_windows()
    assert cal.shape == (text_ids.numel() // 15, 16)
    assert cal[:, 0].tolist() == [BOS] * len(cal)
    assert EOS not in cal.tolist()[0]
    assert torch.equal(cal[:, 1:].reshape(-1), text_ids[: len(cal) * 15])
    ev = prep.evaluation_windows(64)
    assert ev.shape == (4, 16) and ev[:, 0].tolist() == [BOS] * 4
    assert torch.equal(prep.calibration_windows(), cal)


def test_prepared_windows_without_prefix_are_unchanged(byte_tokenizer):
    for tok in (_word_tokenizer(None), byte_tokenizer):
        prep = _prepared(tok, 16)
        cal_ids = tokenize(tok, STREAM_TEXT)
        ev_ids = tokenize(tok, STREAM_TEXT[::-1])
        assert torch.equal(prep.calibration_windows(), _old_windows(cal_ids, 16))
        assert torch.equal(prep.evaluation_windows(64), _old_windows(ev_ids, 16, 64))
        assert torch.equal(prep.evaluation_windows(None), _old_windows(ev_ids, 16))


def test_prepared_tokenizes_each_split_once():
    class Counting:
        calls = 0

        def __call__(self, text, add_special_tokens=True):
            self.calls += 1
            return {"input_ids": list(text.encode("utf-8"))}

    tok = Counting()
    prep = _prepared(tok, 16)
    first = prep.calibration_windows()
    after_first = tok.calls
    assert torch.equal(prep.calibration_windows(), first)
    prep.evaluation_windows(32)
    prep.evaluation_windows(64)
    # One more call for the evaluation split; the prefix and calibration tokens are reused.
    assert tok.calls == after_first + 1


@pytest.mark.slow
def test_default_model_tokenizer_adds_no_prefix(default_model):
    from bitalloc.data import text_prefix
    from bitalloc.stages.prepare import Prepared

    # SmolLM2's tokenizer puts nothing before a text, so its windows (and every profile and
    # number measured on them) are the same as before windows gained a prefix.
    tok = default_model.tokenizer
    assert text_prefix(tok) == ()
    text = default_text()
    prep = Prepared(default_model, [], (), text, 512)
    assert torch.equal(
        prep.calibration_windows(), _old_windows(tokenize(tok, text.calibration), 512)
    )
    ev_ids = tokenize(tok, text.evaluation)
    assert torch.equal(prep.evaluation_windows(4096), _old_windows(ev_ids, 512, 4096))
