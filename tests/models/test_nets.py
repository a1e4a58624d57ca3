"""The CNN, ResNet-9 and text classifier: the contract that grouping and attribution use
(``features`` + ``head`` = forward), vmap gradients equal to autograd, eval-mode batch-norm,
and the bag-of-embeddings invariances."""

import pytest
import torch

from ggda.errors import GGDAError
from ggda.gradients import group_gradients, per_sample_gradients
from ggda.models.functional import per_example_loss
from ggda.models.nets import CNN, MLP, LogisticRegression, ResNet9, TextClassifier


def _with_running_stats(net: torch.nn.Module, shape, seed=0) -> torch.nn.Module:
    """Train-mode forwards so batch-norm running statistics differ from the init."""
    g = torch.Generator().manual_seed(seed)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(2 + 3 * torch.randn(16, *shape, generator=g, dtype=torch.float64))
    return net.eval()


def _nets():
    torch.manual_seed(0)
    resnet = _with_running_stats(ResNet9((3, 8, 8), 3, width=2).double(), (3, 8, 8))
    return [
        ("cnn", CNN((1, 12, 12), 3, channels=[4, 6], hidden=8).double(), (1, 12, 12)),
        ("resnet9", resnet, (3, 8, 8)),
        ("text", TextClassifier((7,), 3, vocab_size=20, embed_dim=5, hidden=[6]).double(), (7,)),
    ]


def _inputs(kind, shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "text":
        x = torch.randint(1, 20, (n, *shape), generator=g)
        x[:, 4:] = torch.where(torch.rand(n, 3, generator=g) < 0.5, 0, x[:, 4:])  # padding
        return x
    return torch.randn(n, *shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("idx", range(3))
def test_features_then_head_is_forward(idx):
    kind, net, shape = _nets()[idx]
    x = _inputs(kind, shape, 5)
    net.eval()
    out = net(x)
    assert out.shape == (5, 3)
    assert torch.allclose(net.head(net.features(x)), out)
    assert isinstance(net.head, torch.nn.Linear) and net.head.out_features == 3


@pytest.mark.parametrize("idx", range(3))
def test_vmap_group_gradients_match_autograd(idx):
    """Per-sample vmap gradients (eval mode) equal one autograd backward per point, and
    group sums equal M^T (per-sample) (the GGDA identity) on every net."""
    kind, net, shape = _nets()[idx]
    x, y = _inputs(kind, shape, 6, seed=1), torch.tensor([0, 1, 2, 0, 1, 2])
    ps = per_sample_gradients(net, x, y, per_example_loss)
    ref = []
    for i in range(6):
        net.zero_grad()
        per_example_loss(net(x[i : i + 1]), y[i : i + 1]).sum().backward()
        ref.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    assert torch.allclose(ps, torch.stack(ref), atol=1e-10)
    gid = torch.tensor([1, 0, 1, 2, 2, 0])
    gg = group_gradients(net, x, y, gid, 3, per_example_loss)
    m = torch.nn.functional.one_hot(gid, 3).double()
    assert torch.allclose(gg, m.T @ ps, atol=1e-10)


def test_resnet_eval_mode_points_do_not_interact():
    _, net, shape = _nets()[1]
    x = _inputs("resnet9", shape, 4)
    alone = torch.cat([net(x[i : i + 1]) for i in range(4)])
    assert torch.allclose(net(x), alone, atol=1e-12)
    net.train()
    assert not torch.allclose(net(x), alone, atol=1e-6)  # train mode: batch statistics


def test_text_classifier_bag_invariances():
    torch.manual_seed(0)
    net = TextClassifier((6,), 2, vocab_size=10, embed_dim=4, hidden=[]).double().eval()
    x = torch.tensor([[3, 4, 5, 0, 0, 0]])
    perm = torch.tensor([[5, 3, 4, 0, 0, 0]])
    longer = torch.tensor([[3, 4, 5, 0, 0, 0, 0, 0]])
    assert torch.allclose(net(x), net(perm)) and torch.allclose(net(x), net(longer))
    # hidden=[]: features are exactly the mean of the non-padding embeddings.
    e = net.embedding.weight
    assert torch.allclose(net.features(x), e[[3, 4, 5]].mean(0, keepdim=True))
    assert torch.allclose(net(x.double()), net(x))  # ids cast to float by a caller
    empty = torch.zeros(1, 6, dtype=torch.long)
    assert torch.isfinite(net(empty)).all()


def test_shape_errors_say_what_to_set():
    with pytest.raises(GGDAError, match="dataset.flatten=false"):
        CNN((784,), 10)
    with pytest.raises(GGDAError, match="dataset.flatten=false"):
        ResNet9((3072,), 10)
    with pytest.raises(GGDAError, match="at least 8x8"):
        ResNet9((1, 4, 4), 10)
    with pytest.raises(GGDAError, match="token ids"):
        TextClassifier((1, 28, 28), 10, vocab_size=50)
    with pytest.raises(ValueError, match="model.net.width"):
        ResNet9((3, 32, 32), 10, width=0)


def test_original_nets_unchanged():
    torch.manual_seed(0)
    assert sum(p.numel() for p in LogisticRegression((5,), 3).parameters()) == 18
    assert sum(p.numel() for p in MLP((5,), 3, hidden=[4]).parameters()) == 24 + 15
    # ResNet-9 at width 64 is the 6.57M-parameter DAWNBench net (10 classes).
    assert sum(p.numel() for p in ResNet9((3, 32, 32), 10).parameters()) == 6_573_130
