"""NegativeBank: the sampler's identity exclusion, determinism and uniformity, the MultiID-2M gallery
reader (both npy formats, malformed files), the FIFO queue, and the safetensors round trip."""

import os
import pickle

import numpy as np
import pytest
import torch

from idflux.losses import NegativeBank


def gen(seed):
    return torch.Generator().manual_seed(seed)


def skewed_ids(kind, K, seed=0):
    g = gen(seed)
    if kind == "uniform":
        return torch.randint(0, 10, (K,), generator=g)
    if kind == "zipf":  # a few identities own most rows, many own one
        w = 1.0 / torch.arange(1, 40, dtype=torch.float64) ** 1.5
        return torch.multinomial(w, K, replacement=True, generator=g) * 7 - 3  # sparse, negative ids too
    if kind == "dominant":  # identity 5 owns all but 3 rows
        ids = torch.full((K,), 5)
        ids[torch.randperm(K, generator=g)[:3]] = torch.tensor([1, 2, 9])
        return ids
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["uniform", "zipf", "dominant"])
@pytest.mark.parametrize("queue", [0, 13])
def test_sample_never_returns_own_identity(kind, queue):
    K, D = 97, 5
    row_ids = skewed_ids(kind, K)
    bank = NegativeBank.from_arrays(torch.randn(K, D), row_ids, queue_capacity=queue)
    if queue:  # a gallery + queue bank: the queue repeats gallery ids and adds new ones
        bank.push(torch.randn(20, D), torch.cat([row_ids[:10], torch.arange(100, 110)]))
    faces = torch.cat([row_ids.unique(), torch.tensor([100, 12345])])  # every identity, a queue-only one, an absent one
    faces = faces.repeat(3)
    for seed in range(25):
        idx = bank.sample(faces, 64, generator=gen(seed))
        assert idx.shape == (faces.numel(), 64) and idx.dtype == torch.int64, f"neg_index {idx.shape} {idx.dtype}"
        assert idx.min() >= 0 and idx.max() < len(bank), f"neg_index out of [0, {len(bank)}): [{idx.min()}, {idx.max()}]"
        same = bank.ids[idx] == faces[:, None]
        assert not same.any(), f"seed {seed}: faces {faces[same.any(1)].tolist()} drew their own identity"


def test_sample_deterministic_and_seed_dependent():
    bank = NegativeBank.from_arrays(torch.randn(200, 4), skewed_ids("zipf", 200))
    faces = torch.tensor([-3, 4, 4, 11, 1000])
    a = bank.sample(faces, 300, generator=gen(7))
    b = bank.sample(faces, 300, generator=gen(7))
    c = bank.sample(faces, 300, generator=gen(8))
    assert torch.equal(a, b), "neg_index differs under the same seed"
    assert not torch.equal(a, c), "neg_index identical under different seeds"
    torch.manual_seed(3)
    d = bank.sample(faces, 300)
    torch.manual_seed(3)
    assert torch.equal(d, bank.sample(faces, 300)), "neg_index differs under the same global seed"


@pytest.mark.parametrize("kind", ["uniform", "zipf", "dominant"])
def test_sample_uniform_over_allowed_rows(kind):
    """Pearson chi-square of the row counts against uniform over the face's complement, loose bound."""
    K = 60
    row_ids = skewed_ids(kind, K, seed=1)
    bank = NegativeBank.from_arrays(torch.randn(K, 3), row_ids)
    for face in row_ids.unique()[:4].tolist():
        idx = bank.sample(torch.full((50,), face), 400, generator=gen(face + 100))
        counts = torch.bincount(idx.flatten(), minlength=K).double()
        allowed = row_ids != face
        assert counts[~allowed].sum() == 0, f"face {face}: drew its own rows"
        expected = idx.numel() / allowed.sum()
        chi2 = ((counts[allowed] - expected) ** 2 / expected).sum().item()
        df = int(allowed.sum()) - 1
        # mean df, sd sqrt(2 df): 6 sd is loose enough to never flake and tight enough to catch a skew
        assert chi2 < df + 6 * (2 * df) ** 0.5 + 1, f"face {face}: chi2 {chi2:.1f} for {df} degrees of freedom"
        assert (counts[allowed] > 0).all(), f"face {face}: some allowed rows never drawn"


def test_sample_m_larger_than_candidates_and_edge_sizes():
    bank = NegativeBank.from_arrays(torch.randn(5, 3), torch.tensor([0, 0, 1, 0, 0]))
    idx = bank.sample(torch.tensor([0, 0]), 50, generator=gen(0))
    assert torch.equal(idx, torch.full((2, 50), 2)), f"face 0 has one candidate (row 2), got {idx.unique().tolist()}"
    idx = bank.sample(torch.tensor([1]), 1000, generator=gen(0))
    assert set(idx.unique().tolist()) == {0, 1, 3, 4}, f"face 1 must reach all four other rows, got {idx.unique().tolist()}"
    assert bank.sample(torch.tensor([0, 1]), 0).shape == (2, 0)
    assert bank.sample(torch.zeros(0, dtype=torch.long), 4).shape == (0, 4)


def test_sample_errors():
    bank = NegativeBank.from_arrays(torch.randn(4, 3), torch.tensor([2, 2, 2, 2]), names={2: "solo"})
    with pytest.raises(ValueError, match=r"identity 2 \('solo'\) owns every"):
        bank.sample(torch.tensor([7, 2]), 3)
    with pytest.raises(ValueError, match="ids"):
        bank.sample(torch.tensor([0.5]), 3)
    with pytest.raises(ValueError, match="m must"):
        bank.sample(torch.tensor([0]), -1)
    with pytest.raises(ValueError, match="owns every"):  # a queue-only bank holding one identity
        q = NegativeBank.fifo(4, 3)
        q.push(torch.randn(2, 3), torch.tensor([1, 1]))
        q.sample(torch.tensor([1]), 2)


def test_from_arrays_checks():
    with pytest.raises(ValueError, match="embeddings"):
        NegativeBank.from_arrays(torch.randn(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="ids"):
        NegativeBank.from_arrays(torch.randn(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="row 1"):
        NegativeBank.from_arrays(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="no entry for ids"):
        NegativeBank.from_arrays(torch.randn(3, 2), torch.tensor([0, 1, 2]), names=["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        NegativeBank.from_arrays(torch.randn(2, 2), torch.tensor([0, 1]), names=["a", "a"])
    bank = NegativeBank.from_arrays(np.ones((2, 3)), np.array([4, 9]), names={4: "x", 9: "y"}, dtype=torch.float16)
    assert bank.embeddings.dtype == torch.float16 and bank.ids.tolist() == [4, 9] and bank.id_of("y") == 9
    with pytest.raises(KeyError, match="zed"):
        bank.id_of("zed")


# --------------------------------------------------------------------------------------- gallery

def write_gallery(root, D=512):
    """ref/<name>/<id>.npy in every accepted format, plus files the reader must ignore."""
    rng = np.random.default_rng(0)
    e = {k: rng.standard_normal(D).astype(np.float32) for k in "abcdef"}
    for name in ("alice", "bob", "carol", "empty"):
        (root / name).mkdir(parents=True)
    np.save(root / "alice" / "0.npy", e["a"])                                   # plain (D,)
    np.save(root / "alice" / "1.npy", e["b"][None].astype(np.float64))         # plain (1, D)
    (root / "alice" / "1.jpg").write_bytes(b"\xff\xd8 not read")
    (root / "alice" / "1.json").write_text('{"bboxes": [[0, 0, 200, 200]]}')
    np.save(root / "bob" / "7.npy", {"embeddings": e["c"][None], "bboxes": np.array([[0, 0, 150, 150]])})  # shard-style dict
    np.save(root / "bob" / "8.npy", {"embeddings": np.stack([e["d"], e["e"]])})  # several faces: row 0 is used
    np.save(root / "carol" / "x.npy", {"embedding": e["f"]})                    # singular key, (D,)
    np.save(root / "alice.npy", e["a"])                                         # cluster centre beside the folders
    return [e["a"], e["b"], e["c"], e["d"], e["f"]]


def test_from_gallery_reads_both_formats(tmp_path):
    rows = write_gallery(tmp_path / "ref")
    bank = NegativeBank.from_gallery(tmp_path / "ref")
    assert bank.names == {0: "alice", 1: "bob", 2: "carol"}, f"names {bank.names}"
    assert bank.ids.tolist() == [0, 0, 1, 1, 2]
    assert bank.embeddings.dtype == torch.float32 and bank.embeddings.shape == (5, 512)
    torch.testing.assert_close(bank.embeddings, torch.from_numpy(np.stack(rows)), msg="gallery embeddings")
    assert bank.id_of("bob") == 1
    idx = bank.sample(torch.tensor([bank.id_of("alice")]), 100, generator=gen(0))
    assert set(idx.unique().tolist()) == {2, 3, 4}


def test_from_gallery_cap_per_identity(tmp_path):
    D = 8
    person = tmp_path / "ref" / "p"
    person.mkdir(parents=True)
    rows = np.arange(12 * D, dtype=np.float32).reshape(12, D)
    for i, r in enumerate(rows):
        np.save(person / f"{i:02d}.npy", r)
    a = NegativeBank.from_gallery(tmp_path / "ref", max_per_identity=5, seed=1)
    b = NegativeBank.from_gallery(tmp_path / "ref", max_per_identity=5, seed=1)
    c = NegativeBank.from_gallery(tmp_path / "ref", max_per_identity=5, seed=2)
    assert a.embeddings.shape == (5, D)
    assert torch.equal(a.embeddings, b.embeddings), "capped subset differs under the same seed"
    assert not torch.equal(a.embeddings, c.embeddings), "capped subset identical under different seeds"
    kept = {tuple(r) for r in a.embeddings.tolist()}
    assert kept <= {tuple(r) for r in rows.tolist()} and len(kept) == 5, "cap must keep distinct original rows"
    assert NegativeBank.from_gallery(tmp_path / "ref", max_per_identity=None).embeddings.shape == (12, D)


@pytest.mark.parametrize("bad", ["garbage", "no_key", "two_rows", "wrong_dim", "nan", "strings"])
def test_from_gallery_malformed_file_names_it(tmp_path, bad):
    root = tmp_path / "ref"
    write_gallery(root)
    path = root / "bob" / "9.npy"
    if bad == "garbage":
        path.write_bytes(b"this is not an npy file")
    elif bad == "no_key":
        np.save(path, {"bboxes": np.zeros((1, 4))})
    elif bad == "two_rows":
        np.save(path, np.zeros((2, 512), np.float32))
    elif bad == "wrong_dim":
        np.save(path, np.zeros(128, np.float32))
    elif bad == "nan":
        np.save(path, np.full(512, np.nan, np.float32))
    else:
        np.save(path, np.array(["a", "b"]))
    with pytest.raises(ValueError, match=r"bob/9\.npy"):
        NegativeBank.from_gallery(root)


class _WritesMarker:
    """Unpickling this with the full pickle module would create ``path`` (the code a crafted file runs)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('ran')",))


@pytest.mark.parametrize("where", ["dict_value", "whole_object"])
def test_from_gallery_refuses_a_crafted_pickle_without_running_it(tmp_path, where):
    root = tmp_path / "ref"
    write_gallery(root)
    marker = tmp_path / "marker"
    evil = {"embeddings": _WritesMarker(marker)} if where == "dict_value" else np.array(_WritesMarker(marker), dtype=object)
    np.save(root / "bob" / "9.npy", evil, allow_pickle=True)
    with pytest.raises(ValueError, match=r"refused .*bob/9\.npy.*builtins\.exec"):
        NegativeBank.from_gallery(root)
    assert not marker.exists(), "code from a gallery file ran"


def test_from_gallery_missing_or_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        NegativeBank.from_gallery(tmp_path / "nowhere")
    (tmp_path / "ref" / "somebody").mkdir(parents=True)
    (tmp_path / "ref" / "somebody" / "0.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="no <name>/\\*.npy"):
        NegativeBank.from_gallery(tmp_path / "ref")
    with pytest.raises(ValueError, match="max_per_identity"):
        NegativeBank.from_gallery(tmp_path / "ref", max_per_identity=0)


# --------------------------------------------------------------------------------------- queue

def test_fifo_order_and_wraparound():
    q = NegativeBank.fifo(4, 2)
    assert len(q) == 0 and q.embeddings.shape == (0, 2) and q.ids.shape == (0,)
    e = torch.arange(20, dtype=torch.float32)[:, None].repeat(1, 2)  # row i is [i, i]
    q.push(e[:3], torch.arange(3))
    assert q.ids.tolist() == [0, 1, 2] and q.embeddings[:, 0].tolist() == [0, 1, 2] and q.queue_next == 3
    q.push(e[3:6], torch.arange(3, 6))  # wraps: 3 -> slot 3, 4 -> slot 0, 5 -> slot 1
    assert q.ids.tolist() == [4, 5, 2, 3] and q.queue_next == 2
    assert q.embeddings[:, 0].tolist() == [4, 5, 2, 3]
    q.push(e[6:15], torch.arange(6, 15))  # more than the capacity: the last 4 stay, entry k in slot (2 + k - 6) % 4
    assert q.ids.tolist() == [12, 13, 14, 11] and q.queue_next == 3, f"slots {q.ids.tolist()}, next {q.queue_next}"
    oldest_first = torch.roll(q.ids, -q.queue_next)
    assert oldest_first.tolist() == [11, 12, 13, 14]
    assert torch.equal(q.embeddings[:, 0].long(), q.ids)


def test_gallery_with_queue_and_push_errors():
    bank = NegativeBank.from_arrays(torch.zeros(3, 2), torch.tensor([0, 1, 2]), queue_capacity=2)
    bank.push(torch.ones(1, 2, dtype=torch.float64), torch.tensor([7], dtype=torch.int32))
    assert bank.ids.tolist() == [0, 1, 2, 7] and bank.embeddings.dtype == torch.float32
    torch.testing.assert_close(bank.embeddings[3], torch.ones(2))
    with pytest.raises(ValueError, match="emb"):
        bank.push(torch.ones(1, 3), torch.tensor([1]))
    with pytest.raises(ValueError, match="ids"):
        bank.push(torch.ones(2, 2), torch.tensor([1]))
    with pytest.raises(ValueError, match="no queue"):
        NegativeBank.from_arrays(torch.zeros(3, 2), torch.tensor([0, 1, 2])).push(torch.ones(1, 2), torch.tensor([1]))


# --------------------------------------------------------------------------------------- save/load

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip(tmp_path, dtype):
    bank = NegativeBank.from_arrays(torch.randn(6, 5), torch.tensor([3, 3, 8, 8, 8, 1]),
                                    names={1: "ann", 3: "bo", 8: "cy é"}, dtype=dtype, queue_capacity=3)
    bank.push(torch.randn(4, 5), torch.tensor([20, 21, 22, 23]))  # wrapped queue: state must survive
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    bank.save(path)  # overwrite in place
    assert os.listdir(tmp_path) == ["bank.safetensors"], f"leftover temporary files: {os.listdir(tmp_path)}"
    back = NegativeBank.load(path)
    assert back.embeddings.dtype == dtype and torch.equal(back.embeddings, bank.embeddings), "embeddings"
    assert torch.equal(back.ids, bank.ids), "ids"
    assert back.names == bank.names and back.id_of("cy é") == 8
    assert (back.num_gallery, back.queue_capacity, back.queue_next) == (6, 3, bank.queue_next)
    faces = torch.tensor([3, 8, 21])
    assert torch.equal(back.sample(faces, 40, generator=gen(5)), bank.sample(faces, 40, generator=gen(5)))
    back.push(torch.randn(1, 5), torch.tensor([99]))
    bank.push(torch.randn(1, 5), torch.tensor([99]))
    assert torch.equal(back.ids, bank.ids), "queue continues at the same slot after load"


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        NegativeBank.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ValueError, match="bad.safetensors"):
        NegativeBank.load(bad)
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a NegativeBank file"):
        NegativeBank.load(other)


def test_queue_state_round_trip():
    import torch as _t

    from idflux.losses import NegativeBank as _NB

    a = _NB.fifo(5, 3)
    a.push(_t.randn(7, 3), _t.arange(7))
    b = _NB.fifo(5, 3)
    b.load_queue_state(a.queue_state())
    assert _t.equal(a.embeddings, b.embeddings) and _t.equal(a.ids, b.ids) and a.queue_next == b.queue_next
