"""Tokenizer, vocabulary, the QNLI TSV loader (tiny files) and the bundled BBC News set."""

from collections import Counter

import pytest
import torch
from data_formats import qnli_rows, write_qnli

from ggda.data.base import split_indices
from ggda.data.loading import DataFileError
from ggda.data.text import PAD, SEP, UNK, BBCNews, QNLIFiles, Vocabulary, pad_ids, tokenize


def test_tokenize():
    assert tokenize("Don't STOP: 3.5% of U.S. e-mail!") == [
        "don", "t", "stop", "3", "5", "of", "u", "s", "e", "mail",
    ]  # fmt: skip
    assert tokenize("  ") == []


def test_vocabulary_counts_ties_and_limits():
    docs = [["b", "a", "c", "a"], ["b", "d", "a", "c"], ["e"]]
    v = Vocabulary.build(docs, max_vocab=6, min_freq=2)
    # a:3, then b and c (2 each, alphabetical); d and e are below min_freq.
    assert v.itos == ["<pad>", "<unk>", "<sep>", "a", "b", "c"]
    assert v.encode(["c", "a", "zzz"]) == [5, 3, UNK]
    assert Vocabulary.build(docs, max_vocab=4, min_freq=1).itos[3:] == ["a"]
    with pytest.raises(ValueError, match="dataset.max_vocab"):
        Vocabulary.build(docs, max_vocab=3, min_freq=1)


def test_pad_ids():
    out = pad_ids([[5, 6, 7], [], [8]], max_len=2)
    assert out.dtype == torch.long and out.tolist() == [[5, 6], [PAD, PAD], [8, PAD]]


def _write(tmp_path, n_train=30, n_dev=12):
    write_qnli(tmp_path / "QNLI" / "train.tsv", qnli_rows(n_train, seed=0))
    dev = qnli_rows(n_dev, seed=1, offset=1000)
    dev[0] = ("What is the zyzzyva?", "The zyzzyva is a weevil.", "entailment")  # dev-only words
    write_qnli(tmp_path / "QNLI" / "dev.tsv", dev)
    return dev


def test_qnli_pairs_vocab_from_train_only(tmp_path):
    dev = _write(tmp_path)
    ds = QNLIFiles(
        str(tmp_path),
        num_train=None,
        num_test=None,
        num_val=6,
        num_queries=4,
        max_len=24,
        min_freq=1,
    )
    b = ds.load()
    assert b.x_train.shape == (24, 24) and b.x_train.dtype == torch.long
    assert b.x_test.shape == (12, 24) and b.num_classes == 2
    vocab = b.meta["vocab"]
    assert "zyzzyva" not in vocab and "weevil" not in vocab
    # dev row 0 (num_test=None keeps all, in order): 'what is the zyzzyva <sep> the zyzzyva..'
    ids = b.x_test[0].tolist()
    stoi = {t: i for i, t in enumerate(vocab)}
    w = [stoi[t] for t in ("what", "is", "the")]
    expect = [*w, UNK, SEP, w[2], UNK, w[1], UNK, UNK]  # 'a' and 'weevil' are not in train
    assert ids[: len(expect)] == expect and ids[len(expect)] == PAD
    # Quotes are ordinary text in GLUE TSVs: the question keeps its words.
    assert b.y_test.tolist() == [0 if r[2] == "entailment" else 1 for r in dev]
    assert "item" in vocab
    # Every vocabulary word occurs in the training pairs (not only in val or test).
    train_words = set()
    for row in b.x_train.tolist():
        train_words |= {vocab[i] for i in row}
    assert set(vocab[3:]) <= train_words
    sub = QNLIFiles(str(tmp_path), num_train=5, num_val=6, num_test=4, num_queries=2).load()
    assert sub.n_train == 5 and sub.x_test.shape[0] == 4


def test_qnli_missing_and_malformed(tmp_path):
    with pytest.raises(DataFileError) as e:
        QNLIFiles(str(tmp_path), num_val=2, num_queries=1).load()
    msg = str(e.value)
    assert "train.tsv" in msg and "QNLI" in msg and f"paths.data_dir={tmp_path}" in msg
    assert "gluebenchmark" in msg
    _write(tmp_path)
    p = tmp_path / "QNLI" / "train.tsv"
    lines = p.read_text().splitlines()
    p.write_text("\n".join([*lines[:2], "7\tonly two fields", *lines[2:]]) + "\n")
    with pytest.raises(DataFileError, match="line 3 has 2 fields"):
        QNLIFiles(str(tmp_path), num_val=2, num_queries=1).load()
    p.write_text("\n".join([*lines[:2], "7\tq?\ts.\tmaybe"]) + "\n")
    with pytest.raises(DataFileError, match="line 3 has label 'maybe'"):
        QNLIFiles(str(tmp_path), num_val=1, num_queries=1).load()
    p.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(DataFileError, match="lacks one of"):
        QNLIFiles(str(tmp_path), num_val=1, num_queries=1).load()


def test_bbc_news_bundled_vocabulary_from_training_split():
    ds = BBCNews(num_queries=10, max_vocab=2000, max_len=64, min_freq=3)
    b = ds.load()
    assert b.meta["classes"] == ["business", "entertainment", "politics", "sports", "tech"]
    y = torch.cat([b.y_train, b.y_val, b.y_test])
    assert torch.bincount(y).tolist() == [510, 386, 417, 511, 401]  # the 2,225 articles
    assert b.x_train.shape == (1625, 64) and int(b.x_train.max()) < 2000
    # Rebuild the vocabulary by brute force from the training articles only.
    texts, labels, _ = BBCNews.documents()
    tr, _, _ = split_indices(len(texts), (1625, 200, 400), 0)
    counts = Counter(t for i in tr.tolist() for t in tokenize(texts[i]))
    top = sorted((t for t, c in counts.items() if c >= 3), key=lambda t: (-counts[t], t))
    assert b.meta["vocab"][3:] == top[: 2000 - 3]
    assert b.y_train.tolist() == [labels[i] for i in tr.tolist()]
    first = tokenize(texts[int(tr[0])])[:64]
    stoi = {t: i for i, t in enumerate(b.meta["vocab"])}
    assert b.x_train[0].tolist() == [stoi.get(t, UNK) for t in first] + [PAD] * (64 - len(first))
