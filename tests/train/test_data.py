"""MultiIDDataset on synthetic shards: crop/resize geometry, face alignment, references, skips, resume."""

import io
import json
import shutil
import tarfile
import warnings
from collections import Counter

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
pytest.importorskip("scipy")

from idflux.kernels import face_warp  # noqa: E402
from idflux.kernels.face_warp_ref import ARCFACE_TEMPLATE  # noqa: E402
from idflux.train.data import MultiIDDataset, PositionSampler, collate_faces, square_crop  # noqa: E402
from idflux.train.synthetic import SCLERA, SyntheticIdentities, write_multiid  # noqa: E402
from synthetic_colours import nearest_colour  # noqa: E402

N_IDS, N_SAMPLES, SEED = 8, 24, 0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiid")
    out = write_multiid(root, N_IDS, N_SAMPLES, size=256, seed=SEED, shard_size=10, refs_per_identity=3)
    return root, out, SyntheticIdentities(N_IDS, SEED)


def person_of(synth, name):
    return synth[synth.names.index(name)]


def eye_is_eye(image_255: np.ndarray, landmarks: np.ndarray, person) -> bool:
    candidates = {"eye": person.eye_colour, "skin": person.skin_colour, "hair": person.hair_colour, "sclera": SCLERA}
    for e in range(2):
        x, y = np.rint(landmarks[e]).astype(int)
        if nearest_colour(image_255[y, x], candidates) != "eye":
            return False
    return True


def to_255(image: torch.Tensor) -> np.ndarray:
    return ((image.permute(1, 2, 0).numpy() + 1.0) * 127.5).astype(np.float64)


def copy_root(src, dst, *, shards: dict | None = None, gallery: bool = True):
    """A dataset folder at dst: ``shards`` {name: bytes} (default: src's), the gallery symlinked or absent."""
    (dst / "shards").mkdir(parents=True)
    if shards is None:
        shards = {p.name: p.read_bytes() for p in sorted((src / "shards").glob("*.tar"))}
    for name, blob in shards.items():
        (dst / "shards" / name).write_bytes(blob)
    if gallery:
        (dst / "ref").symlink_to(src / "ref", target_is_directory=True)
    return dst


def read_tar(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def write_tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def npy_bytes(obj) -> bytes:
    buf = io.BytesIO()
    np.save(buf, obj, allow_pickle=True)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("size", [256, 512])
def test_round_trip_keeps_faces_landmarks_and_embeddings_together(data, size):
    root, out, synth = data
    ds = MultiIDDataset(root, size=size, caption_dropout=0.0, shuffle=False, ref_size=64)
    assert len(ds) == N_SAMPLES and ds.identity_names == synth.names
    non_square = 0
    for p in range(10 if size == 256 else 4):
        s = ds[p]
        assert "skipped" not in s, s
        image = s["image"]
        assert image.shape == (3, size, size) and image.dtype == torch.float32
        assert image.min() >= -1.0 and image.max() <= 1.0
        n = len(s["boxes"])
        assert s["landmarks"].shape == (n, 5, 2) and s["gt_embeddings"].shape == (n, 512) and len(s["names"]) == n
        boxes, lmk = s["boxes"].numpy(), s["landmarks"].numpy()
        assert (boxes >= 0).all() and (boxes <= size).all()
        assert np.all(np.diff(boxes[:, 0]) >= 0), "faces are ordered by box x1"
        img255 = to_255(image)
        for j, name in enumerate(s["names"]):
            person = person_of(synth, name)
            assert ((lmk[j] >= boxes[j, :2] - 1) & (lmk[j] <= boxes[j, 2:] + 1)).all(), f"sample {p} face {j}: landmarks outside box"
            assert eye_is_eye(img255, lmk[j], person), f"sample {p} face {j} ({name}): eye landmark not on an {name} eye"
            cos = float(torch.nn.functional.cosine_similarity(s["gt_embeddings"][j], torch.from_numpy(person.embedding), dim=0))
            assert cos > 0.85, f"sample {p} face {j}: GT embedding not {name}'s (cos {cos:.2f})"
            assert int(s["ids"][j]) == synth.names.index(name)
        assert torch.equal(s["ref_embeddings"], s["gt_embeddings"]) and s["ref_sources"] == ["self"] * n
        assert s["ref_images"].shape == (n, 64, 64, 3) and s["ref_images"].dtype == torch.uint8
        assert s["prompt"] and s["prompt"].startswith("a photo of")
        meta = json.loads(dict(read_tar(out["shards"][0]))[f"{s['key']}.json"])
        non_square += (meta["crop"][2] - meta["crop"][0]) != (meta["crop"][3] - meta["crop"][1])
    assert non_square > 0, "the round trip must include non-square sources"


def test_size_must_be_a_multiple_of_16(data):
    root = data[0]
    with pytest.raises(ValueError, match="size"):
        MultiIDDataset(root, size=200)
    with pytest.raises(ValueError, match="paired_prob"):
        MultiIDDataset(root, paired_prob=1.5)
    with pytest.raises(FileNotFoundError, match="shards"):
        MultiIDDataset(root / "ref")


def test_square_crop_geometry():
    rng = np.random.default_rng(0)
    boxes = np.array([[150.0, 20, 190, 70], [160, 30, 199, 90]])
    for _ in range(20):  # wide image, faces at the right edge: the largest square, inside, holding the faces
        x0, y0, side = square_crop(boxes, 200, 100, rng)
        assert side == 100 and y0 == 0 and 0 <= x0 <= 100 and x0 <= 150 and x0 + side >= 199
    # Faces spanning more than the short side: the square grows, holds them, centred where it must pad.
    x0, y0, side = square_crop(np.array([[5.0, 10, 40, 50], [150, 40, 195, 90]]), 200, 100, rng)
    assert side == 190 and x0 <= 5 and x0 + side >= 195 and y0 < 0 and y0 + side > 100


def test_landmark_fn_is_matched_by_box_and_cached(data, tmp_path):
    from PIL import Image

    root, out, _ = data
    members = read_tar(out["shards"][0])
    files = dict(members)
    stripped, detections = [], {}
    for name, blob in members:
        if name.endswith(".npy"):
            key = name.split(".")[0]
            npy = np.load(io.BytesIO(blob), allow_pickle=True).item()
            crop = json.loads(files[f"{key}.json"])["crop"]
            image = np.asarray(Image.open(io.BytesIO(files[f"{key}.jpg"])).convert("RGB"))
            # The "detector" returns the faces reversed plus a spurious face: order must not matter.
            lm = npy.pop("landmarks") - np.asarray(crop[:2], np.float32)
            spurious = np.full((1, 5, 2), -50.0, np.float32) + np.arange(5, dtype=np.float32)[:, None]
            detections[image.tobytes()] = np.concatenate([lm[::-1], spurious])
            blob = npy_bytes(npy)
        stripped.append((name, blob))
    copy_root(root, tmp_path / "d", shards={"000000.tar": write_tar(stripped)})
    calls = Counter()

    def landmark_fn(image):
        calls["n"] += 1
        return detections[image.tobytes()]

    reference = MultiIDDataset(root, size=256, shuffle=False, caption_dropout=0.0, ref_size=32)
    ds = MultiIDDataset(tmp_path / "d", size=256, shuffle=False, caption_dropout=0.0, ref_size=32, landmark_fn=landmark_fn)
    assert len(ds) == 10
    for p in list(range(10)) + [0, 1]:  # positions 0 and 1 again: served from the cache
        got, want = ds[p], reference[p]
        assert got["key"] == want["key"]
        torch.testing.assert_close(got["landmarks"], want["landmarks"], atol=1e-3, rtol=0, msg=f"landmarks of {got['key']}")
        assert torch.equal(got["gt_embeddings"], want["gt_embeddings"]) and got["names"] == want["names"]
    assert calls["n"] == 10, "landmark_fn runs once per sample"

    plain = MultiIDDataset(tmp_path / "d", size=64, shuffle=False)
    with pytest.warns(RuntimeWarning, match="no_landmarks"):
        assert plain[0]["skipped"] == "no_landmarks"
    with pytest.raises(RuntimeError, match="whole epoch"):
        next(iter(plain))


def test_paired_references_come_from_the_same_identity(data):
    root, _, synth = data
    paired = MultiIDDataset(root, size=64, paired_prob=1.0, caption_dropout=0.0, ref_size=48, seed=3)
    plain = MultiIDDataset(root, size=64, paired_prob=0.0, caption_dropout=0.0, ref_size=48, seed=3)
    faces = 0
    for p in range(8):
        s, t = paired[p], plain[p]
        assert s["key"] == t["key"] and torch.equal(s["image"], t["image"]), "pairing must not change the GT sample"
        for j, (name, source) in enumerate(zip(s["names"], s["ref_sources"])):
            assert bool(s["paired"][j]) and source.split("/")[0] == name, f"face {j} of {name}: reference {source}"
            gallery = {f.stem: np.load(f, allow_pickle=True).item()["embeddings"][0] for f in sorted((root / "ref" / name).glob("*.npy"))}
            ref = s["ref_embeddings"][j].numpy()
            assert np.array_equal(ref, gallery[source.split("/")[1]]), "the reference embedding is its gallery file's"
            gt = s["gt_embeddings"][j].numpy()
            cos = {k: float(v @ gt / np.linalg.norm(v) / np.linalg.norm(gt)) for k, v in gallery.items()}
            assert max(cos, key=cos.get) == source.split("/")[1] and cos[source.split("/")[1]] >= 0.6, f"not the best: {cos}"
            assert not np.array_equal(ref, gt)
            assert (s["ref_images"][j].float() - t["ref_images"][j].float()).abs().mean() > 5, "reference = the GT crop"
            faces += 1
        assert torch.equal(t["ref_embeddings"], t["gt_embeddings"]) and not t["paired"].any()
    assert faces >= 8 and paired.paired_fallbacks == 0


def test_paired_falls_back_to_the_own_crop(data, tmp_path):
    root, _, synth = data
    dst = copy_root(root, tmp_path / "d", gallery=False)
    shutil.copytree(root / "ref", dst / "ref")
    victim = synth.names[0]
    for f in (dst / "ref" / victim).glob("*.npy"):  # a gallery whose embeddings match nobody
        f.write_bytes(npy_bytes({"embeddings": np.random.default_rng(0).standard_normal((1, 512)).astype(np.float32)}))
    ds = MultiIDDataset(dst, size=64, paired_prob=1.0, ref_size=32)
    seen = 0
    for p in range(len(ds)):
        s = ds[p]
        for j, name in enumerate(s["names"]):
            if name == victim:
                assert s["ref_sources"][j] == "self" and not s["paired"][j]
                assert torch.equal(s["ref_embeddings"][j], s["gt_embeddings"][j])
                seen += 1
            else:
                assert s["paired"][j]
    assert seen > 0 and ds.paired_fallbacks == seen


def test_corrupt_samples_are_skipped_and_counted(data, tmp_path):
    root, out, _ = data
    members = read_tar(out["shards"][0])
    keys = sorted({n.split(".")[0] for n, _ in members})
    edits = {
        keys[2]: ("jpg", lambda b: b[: len(b) // 2]),                                        # truncated jpg
        keys[3]: ("json", lambda b: b"{not json"),                                         # bad json
        keys[4]: ("json", lambda b: json.dumps({"caption_en": "x", "names": []}).encode()),  # json without crop
        keys[5]: ("npy", None),                                                             # missing npy
        keys[6]: ("npy", lambda b: npy_bytes({**(d := np.load(io.BytesIO(b), allow_pickle=True).item()),
                                              "embeddings": np.concatenate([d["embeddings"], d["embeddings"][:1]])})),
        keys[7]: ("jpg", lambda b: b[:200]),                                                # truncated jpg again
    }
    bad = []
    for name, blob in members:
        key, ext = name.split(".")
        if key in edits and edits[key][0] == ext:
            if edits[key][1] is None:
                continue
            blob = edits[key][1](blob)
        bad.append((name, blob))
    cut = out["shards"][1].read_bytes()
    shards = {"000000.tar": write_tar(bad), "000001.tar": cut[: int(len(cut) * 0.55)], "000002.tar": b"not a tar file" * 40}
    copy_root(root, tmp_path / "d", shards=shards)
    with pytest.warns(RuntimeWarning, match="bad_shard"):
        ds = MultiIDDataset(tmp_path / "d", size=64, ref_size=16, shuffle=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = [ds[p] for p in range(len(ds))]
    kinds = Counter(r["skipped"] for r in records if "skipped" in r)
    assert kinds["bad_image"] == 2 and kinds["bad_json"] == 1 and kinds["no_crop"] == 1
    assert kinds["missing_npy"] == 1 and kinds["count_mismatch"] == 1
    assert ds.skipped == kinds + Counter(bad_shard=2), "the cut shard and the garbage shard are both bad shards"
    good = [r for r in records if "skipped" not in r]
    assert len(good) >= 4 + 4, "the intact samples before the cut are still read"
    per_kind = Counter(str(w.message).rsplit("[", 1)[1].split("]")[0] for w in caught)
    assert set(per_kind) == set(kinds) and set(per_kind.values()) == {1}, f"one warning per kind: {per_kind}"
    batch = collate_faces(records[:8])
    assert batch["images"].shape[0] == 2 and sum(batch["skipped"].values()) == 6
    assert batch["positions"].tolist() == list(range(8))
    # Iteration drops the skipped records and never raises.
    stream = iter(ds)
    assert len([next(stream) for _ in range(len(good) + 3)]) == len(good) + 3


def test_caption_dropout_rate_and_fixed_prompt(data):
    root, _, _ = data
    ds = MultiIDDataset(root, size=64, caption_dropout=0.3, ref_size=16, seed=5)
    prompts = [ds[p]["prompt"] for p in range(240)]
    rate = prompts.count("") / len(prompts)
    assert 0.22 < rate < 0.38, f"caption dropout rate {rate:.3f} for p = 0.3"
    assert all(p.startswith("a photo of") for p in prompts if p)
    fixed = MultiIDDataset(root, size=64, caption_dropout=0.0, fixed_prompt="two people", ref_size=16)
    assert {fixed[p]["prompt"] for p in range(6)} == {"two people"}
    counted = MultiIDDataset(root, size=64, caption_dropout=0.0, fixed_prompt="{people}, photo", ref_size=16)
    words = {1: "one person", 2: "two people", 3: "three people", 4: "four people"}
    for p in range(6):
        s = counted[p]
        assert s["prompt"] == f"{words[len(s['boxes'])]}, photo"


def test_state_dict_resume_gives_the_same_samples(data):
    root, _, _ = data

    def same(a, b):
        return (a["key"] == b["key"] and a["prompt"] == b["prompt"] and a["position"] == b["position"]
                and torch.equal(a["image"], b["image"]) and torch.equal(a["ref_images"], b["ref_images"]))

    kw = dict(size=64, paired_prob=0.5, ref_size=16, seed=7)
    ds = MultiIDDataset(root, **kw)
    stream = iter(ds)
    for _ in range(20):
        next(stream)
    state = ds.state_dict()
    assert state["position"] == 20
    after = [next(stream) for _ in range(8)]  # crosses into the second epoch (24 samples)
    resumed = MultiIDDataset(root, **kw)
    resumed.load_state_dict(state)
    again = iter(resumed)
    assert all(same(a, next(again)) for a in after), "resuming must give the same following samples"
    assert len({s["key"] for s in after[4:]}) == 4 and after[4]["position"] == 24

    loader = torch.utils.data.DataLoader(resumed, batch_size=4, sampler=PositionSampler(20, num_samples=8), collate_fn=collate_faces)
    batches = list(loader)
    assert [k for b in batches for k in b["keys"]] == [s["key"] for s in after]
    assert torch.cat([b["positions"] for b in batches]).tolist() == list(range(20, 28))
    with pytest.raises(ValueError, match="seed"):
        MultiIDDataset(root, size=64, seed=8).load_state_dict(state)


def test_seed_determines_everything(data):
    root, _, _ = data
    a, b, c = (MultiIDDataset(root, size=64, paired_prob=0.5, ref_size=16, seed=s) for s in (1, 1, 2))
    for p in range(4):
        x, y = a[p], b[p]
        assert x["key"] == y["key"] and torch.equal(x["image"], y["image"]) and torch.equal(x["ref_images"], y["ref_images"])
    assert [a[p]["key"] for p in range(6)] != [c[p]["key"] for p in range(6)], "another seed, another order"
    assert sorted(a[p]["key"] for p in range(N_SAMPLES)) == sorted(c[p]["key"] for p in range(N_SAMPLES)), "an epoch is a permutation"


def test_collate_faces_feeds_face_warp(data):
    root, _, synth = data
    ds = MultiIDDataset(root, size=256, caption_dropout=0.0, ref_size=16, shuffle=False)
    batch = collate_faces([ds[p] for p in range(4)])
    F = int(batch["num_faces"].sum())
    assert batch["images"].shape == (4, 3, 256, 256) and batch["landmarks"].shape == (F, 5, 2)
    assert batch["image_index"].tolist() == [b for b, n in enumerate(batch["num_faces"].tolist()) for _ in range(n)]
    assert [len(b) for b in batch["image_boxes"]] == batch["num_faces"].tolist() and len(batch["names"]) == F
    crops = face_warp(batch["images"], batch["landmarks"], batch["image_index"], backend="torch")
    for f, name in enumerate(batch["names"]):
        assert eye_is_eye(to_255(crops[f]), np.asarray(ARCFACE_TEMPLATE), person_of(synth, name)), f"face {f} ({name}) not aligned"


class _WritesMarker:
    """Unpickling this with the full pickle module would create ``path`` (the code a crafted file runs)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('ran')",))


def test_crafted_npy_in_a_shard_or_gallery_is_refused_without_running(data, tmp_path):
    """The sample npy and the gallery npy are pickles: a crafted one is skipped (unsafe_npy) and the code
    its __reduce__ names never runs; the other samples load."""
    root, out, _ = data
    marker = tmp_path / "marker"
    members = read_tar(out["shards"][0])
    keys = sorted({n.split(".")[0] for n, _ in members})
    crafted = [(n, npy_bytes({"bboxes": _WritesMarker(marker), "embeddings": np.zeros((1, 512))}) if n == f"{keys[1]}.npy"
                else npy_bytes(np.array(_WritesMarker(marker), dtype=object)) if n == f"{keys[2]}.npy" else b)
               for n, b in members]
    shutil.copytree(root / "ref", tmp_path / "d" / "ref")
    for f in (tmp_path / "d" / "ref").glob("*/0000.npy"):  # every identity's first gallery image
        f.write_bytes(npy_bytes({"embeddings": _WritesMarker(marker)}))
    (tmp_path / "d" / "shards").mkdir()
    (tmp_path / "d" / "shards" / "000000.tar").write_bytes(write_tar(crafted))
    ds = MultiIDDataset(tmp_path / "d", size=64, ref_size=16, shuffle=False, paired_prob=1.0, paired_min_cos=-1.0)
    with pytest.warns(RuntimeWarning, match="builtins.exec"):
        records = [ds[p] for p in range(len(ds))]
    assert not marker.exists(), "code from a data file ran"
    assert [r.get("skipped") for r in records[1:3]] == ["unsafe_npy", "unsafe_npy"]
    assert all("skipped" not in r for i, r in enumerate(records) if i not in (1, 2))
    assert ds.skipped["unsafe_npy"] == 2 and ds.skipped["unsafe_gallery_npy"] >= 1
    assert all(src.split("/")[-1] != "0000" for r in records if "skipped" not in r for src in r["ref_sources"])


def test_safe_npy_reads_what_np_save_writes():
    from idflux.safe_npy import load_npy

    obj = {"bboxes": np.arange(8.0).reshape(2, 4), "names": ["a", "b"], "n": np.int64(3), "t": (1, 2.5), "s": {1}}
    got = load_npy(npy_bytes(obj))
    assert got.keys() == obj.keys() and np.array_equal(got["bboxes"], obj["bboxes"])
    assert got["names"] == ["a", "b"] and got["n"] == 3 and got["t"] == (1, 2.5) and got["s"] == {1}
    plain = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(load_npy(npy_bytes(plain)), plain)
    with pytest.raises(ValueError, match="not an .npy"):
        load_npy(b"garbage", name="x.npy")
