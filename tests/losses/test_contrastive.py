"""ContrastiveLoss: equals a direct cosine_infonce call with the bank's draws and the explicit
F.cross_entropy formulation; gradients reach g and pos only; the 4096 = in-batch + gallery count;
queue mode; module plumbing (state_dict, .to) and bad arguments."""

import pytest
import torch
import torch.nn.functional as F

import idflux.losses.contrastive as contrastive
from idflux.kernels import _backend, cosine_infonce
from idflux.losses import ContrastiveLoss, NegativeBank
from sync_probe import host_syncs


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_case(N=6, D=16, K=40, n_ids=8, dtype=torch.float64, seed=0):
    """Faces whose identities repeat within the batch (in-batch exclusion) and live in the bank."""
    g = torch.Generator().manual_seed(seed)
    bank = NegativeBank.from_arrays(torch.randn(K, D, generator=g, dtype=dtype), torch.randint(0, n_ids, (K,), generator=g))
    pos = torch.randn(N, D, generator=g, dtype=dtype)
    emb = pos + 1.2 * torch.randn(N, D, generator=g, dtype=dtype)
    ids = torch.randint(0, n_ids, (N,), generator=g)
    ids[1] = ids[0]
    return bank, emb, pos, ids


def ce_formulation(g, pos, bank, neg_index, ids, tau, weight, in_batch):
    """-log softmax of the positive among [positive, drawn negatives, other identities' positives]."""
    u, v = F.normalize(g, dim=-1, eps=1e-6), F.normalize(pos, dim=-1, eps=1e-6)
    n = F.normalize(bank.embeddings.to(g.dtype), dim=-1, eps=1e-6)
    losses = []
    for r in range(g.shape[0]):
        cands = [v[r : r + 1], n[neg_index[r]]]
        if in_batch:
            cands.append(v[(ids != ids[r])])
        logits = torch.cat(cands) @ u[r] / tau
        losses.append(F.cross_entropy(logits[None], torch.zeros(1, dtype=torch.long)))
    return weight * torch.stack(losses).mean()


@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("tau,weight", [(0.1, 0.1), (0.5, 1.0)])
def test_equals_direct_call_and_cross_entropy(in_batch, tau, weight):
    bank, g, pos, ids = make_case()
    loss_fn = ContrastiveLoss(bank, tau=tau, weight=weight, in_batch=in_batch, num_negatives=12, backend="torch")
    got = loss_fn(g, pos, ids, generator=gen(3))
    m = 12 - 5 if in_batch else 12
    neg_index = bank.sample(ids, m, generator=gen(3))
    assert not (bank.ids[neg_index] == ids[:, None]).any(), "drawn negatives share the face's identity"
    direct = weight * cosine_infonce(g, pos, bank.embeddings, neg_index=neg_index, tau=tau, in_batch=in_batch,
                                     ids=ids, neg_ids=bank.ids, backend="torch")
    torch.testing.assert_close(got, direct, rtol=0, atol=0, msg="loss vs direct cosine_infonce")
    torch.testing.assert_close(got, ce_formulation(g, pos, bank, neg_index, ids, tau, weight, in_batch),
                               msg="loss vs explicit cross-entropy")
    assert not torch.equal(got, loss_fn(g, pos, ids, generator=gen(4))), "other seed, other draws, same loss"


@pytest.mark.skipif(not _backend.INTERPRET, reason="needs TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU machines)")
def test_triton_backend_passthrough():
    bank, g, pos, ids = make_case(N=3, D=8, K=20, dtype=torch.float32)
    ref = ContrastiveLoss(bank, num_negatives=9, backend="torch")(g, pos, ids, generator=gen(1))
    tri = ContrastiveLoss(bank, num_negatives=9, backend="triton")(g, pos, ids, generator=gen(1))
    torch.testing.assert_close(tri, ref, rtol=1e-5, atol=1e-6, msg="triton backend vs torch backend")


def test_gradients_reach_g_and_pos_only():
    bank_rows = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    bank = NegativeBank.from_arrays(bank_rows, torch.arange(30) % 6)
    g = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    loss = ContrastiveLoss(bank, num_negatives=16, backend="torch")(g, pos, torch.tensor([0, 1, 2, 3]), generator=gen(0))
    loss.backward()
    for name, t in (("g", g), ("pos", pos)):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, f"{name}.grad missing or zero"
    assert bank_rows.grad is None and not bank.embeddings.requires_grad, "gradient reached the bank"
    # float64 gradcheck of the module (the draws are fixed by re-seeding inside the function)
    ids = torch.tensor([0, 0, 3, 5])
    fn = ContrastiveLoss(bank, num_negatives=10, backend="torch")
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, ids, generator=gen(2)), (g.detach().requires_grad_(), pos.detach().requires_grad_()))


def test_in_batch_count_makes_num_negatives(monkeypatch):
    bank = NegativeBank.from_arrays(torch.randn(50, 4), torch.arange(50) % 25)
    with_ib = ContrastiveLoss(bank)
    without = ContrastiveLoss(bank, in_batch=False)
    assert (with_ib.num_negatives, with_ib.tau, with_ib.weight, with_ib.in_batch) == (4096, 0.1, 0.1, True)
    assert with_ib.gallery_draws(64) == 4033, "released recipe: 63 in-batch + 4033 gallery = 4096"
    assert with_ib.gallery_draws(1) == 4096 and without.gallery_draws(64) == 4096
    assert ContrastiveLoss(bank, num_negatives=10).gallery_draws(64) == 0, "in-batch beyond the budget: no draws"

    calls = []

    def spy(g, pos, negatives, **kw):
        calls.append((negatives, kw))
        return cosine_infonce(g, pos, negatives, **kw)

    monkeypatch.setattr(contrastive, "cosine_infonce", spy)
    ids = torch.arange(64) % 25
    with_ib(torch.randn(64, 4), torch.randn(64, 4), ids, generator=gen(0))
    negatives, kw = calls[-1]
    assert kw["neg_index"].shape == (64, 4033) and kw["in_batch"] is True, f"neg_index {tuple(kw['neg_index'].shape)}"
    assert negatives is not None and torch.equal(kw["neg_ids"], bank.ids) and torch.equal(kw["ids"], ids)
    assert (kw["tau"], kw["reduction"]) == (0.1, "mean")
    without(torch.randn(64, 4), torch.randn(64, 4), ids)
    assert calls[-1][1]["neg_index"].shape == (64, 4096) and calls[-1][1]["in_batch"] is False


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not _backend.INTERPRET, reason="needs TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU machines)"))])
def test_loss_step_never_syncs_with_the_host(backend, monkeypatch):
    """The bank's draws are in range by construction: cosine_infonce runs with check=False and the
    sampler with check=False, so a step (forward and backward) never syncs."""
    bank, g, pos, ids = make_case(N=4, D=8, K=20, dtype=torch.float32)
    g.requires_grad_()
    checks = []

    def spy(*args, **kw):
        checks.append(kw.get("check"))
        return cosine_infonce(*args, **kw)

    monkeypatch.setattr(contrastive, "cosine_infonce", spy)
    loss_fn = ContrastiveLoss(bank, num_negatives=9, backend=backend)
    found = host_syncs(lambda: loss_fn(g, pos, ids, generator=gen(0)).backward())
    assert checks == [False], f"cosine_infonce check= {checks}"
    assert g.grad is not None and torch.isfinite(g.grad).all(), "the probed step ran backward"
    assert not found, f"host syncs in a contrastive step: {found}"
    assert host_syncs(lambda: bank.sample(ids, 9, generator=gen(0))), "sample(check=True) reads back (the probe must see it)"
    assert not host_syncs(lambda: ContrastiveLoss(None, backend=backend)(g, pos, ids).backward()), "in-batch only: no sync"


def test_in_batch_only_without_bank():
    _, g, pos, ids = make_case()
    got = ContrastiveLoss(None, backend="torch")(g, pos, ids)
    want = 0.1 * cosine_infonce(g, pos, g.new_zeros(0, g.shape[1]), in_batch=True, ids=ids, backend="torch")
    torch.testing.assert_close(got, want, rtol=0, atol=0, msg="in-batch-only loss")


def test_queue_mode_fills_in_training_only():
    D = 8
    queue = NegativeBank.fifo(6, D, dtype=torch.float64)
    loss_fn = ContrastiveLoss(queue, num_negatives=5, backend="torch")
    _, g, pos, ids = make_case(N=4, D=D)
    first = loss_fn(g, pos, ids)  # empty queue: in-batch negatives only
    want = 0.1 * cosine_infonce(g, pos, g.new_zeros(0, D), in_batch=True, ids=ids, backend="torch")
    torch.testing.assert_close(first, want, rtol=0, atol=0, msg="loss with an empty queue")
    assert torch.equal(queue.ids, ids) and torch.equal(queue.embeddings, pos), "training forward pushes pos and ids"
    other = torch.tensor([50, 51, 52, 53])
    neg_index = queue.sample(other, 2, generator=gen(0))  # before the forward pushes: 2 draws per face from 4 rows
    want = 0.1 * cosine_infonce(g, pos, queue.embeddings.clone(), neg_index=neg_index, in_batch=True, ids=other,
                                neg_ids=queue.ids.clone(), backend="torch")
    second = loss_fn(g, pos, other, generator=gen(0))
    torch.testing.assert_close(second, want, rtol=0, atol=0, msg="loss drawing from the queue")
    assert queue.ids.tolist() == [52, 53] + ids[2:].tolist() + [50, 51], f"queue after a wrapping push: {queue.ids.tolist()}"
    loss_fn.eval()
    loss_fn(g, pos, torch.tensor([60, 61, 62, 63]))
    assert queue.ids.tolist() == [52, 53] + ids[2:].tolist() + [50, 51], "eval forward must not push"


def test_module_plumbing_and_bad_arguments():
    bank = NegativeBank.from_arrays(torch.randn(10, 4), torch.arange(10))
    loss_fn = ContrastiveLoss(bank)
    assert loss_fn.state_dict() == {}, "the bank must stay out of checkpoints"
    loss_fn.to(torch.float64)
    assert bank.embeddings.dtype == torch.float64 and bank.ids.dtype == torch.int64, ".to() moves/casts the bank"
    assert "tau=0.1" in repr(loss_fn) and "gallery=10" in repr(loss_fn)
    for kw, arg in (({"tau": 0.0}, "tau"), ({"weight": float("nan")}, "weight"), ({"num_negatives": -1}, "num_negatives"),
                    ({"in_batch": 1}, "in_batch")):
        with pytest.raises(ValueError, match=arg):
            ContrastiveLoss(bank, **kw)
    with pytest.raises(ValueError, match="bank"):
        ContrastiveLoss(torch.randn(3, 4))
    with pytest.raises(ValueError, match="in_batch=True"):
        ContrastiveLoss(None, in_batch=False)
    with pytest.raises(ValueError, match="backend"):
        ContrastiveLoss(bank, num_negatives=3, backend="cuda")(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0, 1]))


@needs_cuda
def test_cuda_draws_and_triton_loss():
    """Released sizes on the GPU: 64 faces, 63 in-batch + 4033 drawn negatives from a bf16 bank."""
    dev = torch.device("cuda")
    K, D, N = 20000, 512, 64
    bank = NegativeBank.from_arrays(torch.randn(K, D), torch.arange(K) % 500, device=dev, dtype=torch.bfloat16)
    ids = torch.arange(N, device=dev) % 40  # repeated identities in the batch
    neg_index = bank.sample(ids, 4033, generator=torch.Generator(dev).manual_seed(0))
    assert neg_index.device.type == "cuda" and not (bank.ids[neg_index] == ids[:, None]).any(), "own identity drawn on CUDA"
    assert torch.equal(neg_index, bank.sample(ids, 4033, generator=torch.Generator(dev).manual_seed(0))), "CUDA draws not reproducible"
    g = torch.randn(N, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.randn(N, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    out, grads = {}, {}
    for backend in ("triton", "torch"):
        g.grad = pos.grad = None
        out[backend] = ContrastiveLoss(bank, backend=backend)(g, pos, ids, generator=torch.Generator(dev).manual_seed(1))
        out[backend].backward()
        grads[backend] = (g.grad.float(), pos.grad.float())
    torch.testing.assert_close(out["triton"], out["torch"], rtol=1e-4, atol=1e-5, msg="loss triton vs torch")
    for name, a, b in zip(("g.grad", "pos.grad"), grads["triton"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-5, msg=name)


def test_identity_owning_the_whole_bank_gets_in_batch_negatives_only_without_sync():
    import torch

    from idflux.losses.negative_bank import NegativeBank

    emb = torch.randn(6, 8)
    bank = NegativeBank(emb, torch.zeros(6, dtype=torch.long))  # every row is identity 0
    g, pos = torch.randn(3, 8), torch.randn(3, 8)
    ids = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="owns every one"):
        bank.sample(ids, 4)
    loss_fn = ContrastiveLoss(bank, num_negatives=6, weight=1.0)
    assert not host_syncs(lambda: loss_fn(g, pos, ids, generator=gen(0)))
    got = loss_fn(g, pos, ids, generator=gen(0))
    idx = bank.sample(ids, loss_fn.gallery_draws(3), generator=gen(0), check=False)
    kw = dict(tau=loss_fn.tau, in_batch=loss_fn.in_batch, ids=ids, neg_ids=bank.ids)
    torch.testing.assert_close(got, cosine_infonce(g, pos, emb, neg_index=idx, **kw))
    per_row = cosine_infonce(g, pos, emb, neg_index=idx, reduction="none", **kw)
    in_batch_only = cosine_infonce(g, pos, emb[:0], reduction="none", tau=loss_fn.tau, in_batch=True, ids=ids)
    torch.testing.assert_close(per_row[0], in_batch_only[0], msg="row 0: its own rows excluded, in-batch negatives only")


def test_valid_mask_leaves_faces_out_of_the_mean():
    import torch

    bank, g, pos, ids = make_case(N=5, D=8, K=20, dtype=torch.float64)
    loss_fn = ContrastiveLoss(bank, num_negatives=9, weight=0.5)
    valid = torch.tensor([True, False, True, True, False])
    got = loss_fn(g, pos, ids, generator=gen(0), valid=valid)
    idx = bank.sample(ids, loss_fn.gallery_draws(5), generator=gen(0), check=False)
    per_row = cosine_infonce(g, pos, bank.embeddings, neg_index=idx, tau=loss_fn.tau, in_batch=loss_fn.in_batch,
                             ids=ids, neg_ids=bank.ids, reduction="none")
    torch.testing.assert_close(got, 0.5 * per_row[valid].mean())
    assert loss_fn(g, pos, ids, generator=gen(0), valid=torch.zeros(5, dtype=torch.bool)) == 0
