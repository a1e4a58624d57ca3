"""Scores above ``scores_mmap_bytes`` go to a memory-mapped scores.npy; readers take both."""

import json

import numpy as np
import pytest
import torch

from ggda.lightning.callbacks.attribution import SCORES_NPY, SCORES_PT, load_scores, save_scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_scores_are_memory_mapped_and_read_back_exactly(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(300, 7, generator=g, dtype=dtype)
    nbytes = scores.numel() * scores.element_size()
    assert save_scores(tmp_path, scores, mmap_bytes=nbytes) == SCORES_PT  # at the limit: .pt
    assert torch.equal(torch.load(tmp_path / SCORES_PT), scores)
    name = save_scores(tmp_path, scores, mmap_bytes=nbytes - 1)
    assert name == SCORES_NPY and not (tmp_path / SCORES_PT).exists()  # one file holds them
    (tmp_path / "metrics.json").write_text(json.dumps({"attribution/scores_file": name}))
    mapped = np.load(tmp_path / SCORES_NPY, mmap_mode="r")
    assert isinstance(mapped, np.memmap) and mapped.dtype == scores.numpy().dtype
    back = load_scores(tmp_path)
    assert back.dtype == dtype and torch.equal(back, scores)
    assert torch.equal(load_scores(tmp_path, mmap=False), scores)
    assert not list(tmp_path.glob(".*tmp"))  # written via a temp file, renamed


def test_reader_without_metrics_finds_the_file(tmp_path):
    scores = torch.arange(12.0).reshape(4, 3)
    save_scores(tmp_path, scores, mmap_bytes=0)
    assert torch.equal(load_scores(tmp_path), scores)
    save_scores(tmp_path, scores, mmap_bytes=1 << 20)  # small again: back to scores.pt
    assert not (tmp_path / SCORES_NPY).exists()
    assert torch.equal(load_scores(tmp_path), scores)
