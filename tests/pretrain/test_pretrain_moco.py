"""The model: queues (FIFO, wrap-around), EMA closed forms, the key net's isolation."""

from __future__ import annotations

import math

import pytest
import torch
from pretrain_utils import tiny_config, tiny_model, views

from amoc.nets import DualBatchNorm2d


def simulate_ring(size: int, batches: list[torch.Tensor], initial: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Reference FIFO, one column at a time."""
    ring, ptr = initial.clone(), 0
    for keys in batches:
        for row in keys:
            ring[:, ptr] = row
            ptr = (ptr + 1) % size
    return ring, ptr


@pytest.mark.parametrize("size,batch", [(10, 3), (7, 7), (8, 3), (5, 2), (9, 4), (12, 5)])
@pytest.mark.parametrize("name", ["clean", "adv"])
def test_queue_fifo_wraps_around(size, batch, name):
    cfg = tiny_config(f"pretrain.queue_size_adv={size}", "pretrain.batch_size=2", queue_size=size)
    model = tiny_model(cfg)
    queue = model.negatives(name)
    initial = queue.clone()
    dim = queue.shape[0]
    batches = [torch.full((batch, dim), float(i + 1)) + torch.arange(batch)[:, None] / 100 for i in range(7)]
    for i, keys in enumerate(batches):
        model.enqueue(name, keys)
        expected, ptr = simulate_ring(size, batches[: i + 1], initial)
        assert torch.equal(model.negatives(name), expected), f"after batch {i + 1}"
        assert int(getattr(model, f"ptr_{name}")) == ptr == (batch * (i + 1)) % size
    other = "adv" if name == "clean" else "clean"
    assert int(getattr(model, f"ptr_{other}")) == 0  # the other queue is untouched


def test_enqueue_more_than_the_queue_is_refused():
    model = tiny_model(tiny_config("pretrain.batch_size=2", queue_size=8))
    with pytest.raises(ValueError, match="cannot enqueue 9"):
        model.enqueue("clean", torch.zeros(9, 8))


def test_queues_are_persistent_buffers_of_the_right_shape():
    cfg = tiny_config("pretrain.queue_size_adv=24", queue_size=40)
    model = tiny_model(cfg)
    state = model.state_dict()
    assert state["queue_clean"].shape == (8, 40) and state["queue_adv"].shape == (8, 24)
    assert {"ptr_clean", "ptr_adv"} <= set(state)
    # random Gaussian columns, L2-normalised, in the scaled form the key net emits
    for queue in (model.queue_clean, model.queue_adv):
        norms = queue.norm(dim=0)
        assert torch.allclose(norms, torch.full_like(norms, 1 / math.sqrt(cfg.model.temperature)), rtol=1e-5)
    assert not model.negatives("clean").requires_grad


def test_embeddings_are_unit_over_sqrt_t():
    model = tiny_model()
    x, _ = views()
    for branch in ("clean", "adv"):
        q = model.queries(x, branch)
        k = model.keys(x, branch)
        assert q.shape == (8, 8) and q.requires_grad and not k.requires_grad
        for z in (q, k):
            assert torch.allclose(z.norm(dim=1), torch.full((8,), 1 / math.sqrt(0.2)), rtol=1e-5)
    # a fresh key net is an exact copy, so in the same mode it gives the same embedding
    assert torch.equal(model.queries(x, "clean").detach(), model.keys(x, "clean"))


def test_projector_shape():
    model = tiny_model(tiny_config("model.hidden_dim=12", "model.feature_dim=6"))
    lin1, relu, lin2 = model.query.projector
    assert (lin1.in_features, lin1.out_features, lin2.out_features) == (model.encoder.feature_dim, 12, 6)
    assert isinstance(relu, torch.nn.ReLU)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.query.projector.modules())


def _randomise(model) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in list(model.query.parameters()) + list(model.key.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
        for b in model.key.buffers():
            if b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=g))
    key_buffers = {n: b.clone() for n, b in model.key.named_buffers()}
    return ([p.clone() for p in model.query.parameters()], [p.clone() for p in model.key.parameters()], key_buffers)


@pytest.mark.parametrize("momentum", [1.0, 0.0, 0.5])
def test_ema_closed_forms(momentum):
    model = tiny_model(tiny_config(f"model.key_momentum={momentum}"))
    query, key, key_buffers = _randomise(model)
    model.update_key()
    for q, k_before, k_after in zip(query, key, model.key.parameters()):
        if momentum == 1.0:
            assert torch.equal(k_after, k_before)  # m = 1 keeps
        elif momentum == 0.0:
            assert torch.equal(k_after, q)  # m = 0 copies
        else:
            assert torch.equal(k_after, (k_before + q) / 2)  # m = 0.5 averages
    for q, q_after in zip(query, model.query.parameters()):
        assert torch.equal(q, q_after)  # the query net is never touched
    for name, b in model.key.named_buffers():
        assert torch.equal(b, key_buffers[name]), f"buffer {name} was averaged"  # BN stats are not EMA'd


def test_ema_default_momentum_formula():
    model = tiny_model()
    query, key, _ = _randomise(model)
    model.update_key()
    m = 0.999
    for q, k_before, k_after in zip(query, key, model.key.parameters()):
        assert torch.allclose(k_after, m * k_before + (1 - m) * q, rtol=1e-6, atol=1e-7)


def test_key_net_gets_no_gradient():
    model = tiny_model()
    x_q, x_k = views()
    assert all(not p.requires_grad for p in model.key.parameters())
    assert all(p.requires_grad for p in model.query.parameters())
    loss = (model.queries(x_q, "clean") * model.keys(x_k, "clean")).sum()
    loss.backward()
    assert all(p.grad is None for p in model.key.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.query.parameters())


def test_key_net_is_a_separate_copy():
    model = tiny_model()
    q_ids = {id(p) for p in model.query.parameters()}
    assert not q_ids & {id(p) for p in model.key.parameters()}
    assert (
        sum(isinstance(m, DualBatchNorm2d) for m in model.key.modules())
        == sum(isinstance(m, DualBatchNorm2d) for m in model.query.modules())
        > 0
    )
