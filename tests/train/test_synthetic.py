"""The synthetic identity generator: exact landmarks, placement, determinism, the MultiID-2M writer."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")

from idflux.kernels import face_warp  # noqa: E402
from idflux.kernels.face_warp_ref import ARCFACE_TEMPLATE  # noqa: E402
from idflux.train.synthetic import SCLERA, SyntheticIdentities, write_multiid  # noqa: E402
from synthetic_colours import nearest_colour  # noqa: E402


def face_colours(person) -> dict:
    return {"eye": person.eye_colour, "skin": person.skin_colour, "hair": person.hair_colour, "sclera": SCLERA}


def test_identities_are_seeded_and_independent_of_count():
    a, b, c = SyntheticIdentities(5, seed=3), SyntheticIdentities(9, seed=3), SyntheticIdentities(5, seed=4)
    for i in range(5):
        assert np.array_equal(a[i].geometry, b[i].geometry) and np.array_equal(a[i].embedding, b[i].embedding), f"identity {i}"
    assert not np.array_equal(a[0].geometry, c[0].geometry), "another seed must give other people"
    emb = np.stack([p.embedding for p in b.identities])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5, err_msg="identity embeddings are unit vectors")
    off = (emb @ emb.T)[~np.eye(len(b), dtype=bool)]
    assert np.abs(off).max() < 0.3, f"identity embeddings should be nearly orthogonal, max |cos| {np.abs(off).max():.3f}"
    assert a.names[2] == "synth_00002"


def test_render_scene_is_deterministic():
    synth = SyntheticIdentities(6, seed=0)
    first = synth.render_scene(np.random.default_rng(7), [1, 4, 2], (160, 224))
    again = synth.render_scene(np.random.default_rng(7), [1, 4, 2], (160, 224))
    other = synth.render_scene(np.random.default_rng(8), [1, 4, 2], (160, 224))
    for name, x, y in zip(("image", "boxes", "landmarks", "ids"), first, again):
        assert np.array_equal(x, y), f"{name} differs under the same seed"
    assert not np.array_equal(first[0], other[0]), "another seed must give another image"
    assert first[3].tolist() == [1, 4, 2]


@pytest.mark.parametrize("n_faces,size", [(1, (128, 128)), (2, (160, 224)), (3, (256, 192)), (4, (192, 192))])
def test_landmarks_land_on_the_faces(n_faces, size):
    synth = SyntheticIdentities(8, seed=1)
    for trial in range(4):
        rng = np.random.default_rng([n_faces, trial])
        ids = rng.choice(8, n_faces, replace=False)
        image, boxes, landmarks, out_ids = synth.render_scene(rng, ids, size)
        H, W = size
        assert image.shape == (H, W, 3) and image.dtype == np.uint8
        assert boxes.shape == (n_faces, 4) and landmarks.shape == (n_faces, 5, 2)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= W).all() and (boxes[:, 3] <= H).all(), f"boxes {boxes} leave the image"
        for j in range(n_faces):
            for k in range(j + 1, n_faces):
                a, b = boxes[j], boxes[k]
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], f"boxes {j} and {k} overlap"
            person = synth[int(out_ids[j])]
            inside = (landmarks[j] >= boxes[j, :2]).all(1) & (landmarks[j] <= boxes[j, 2:]).all(1)
            assert inside.all(), f"face {j}: landmarks {landmarks[j].tolist()} outside box {boxes[j].tolist()}"
            for e in range(2):
                x, y = np.rint(landmarks[j, e]).astype(int)
                got = nearest_colour(image[y, x], face_colours(person))
                assert got == "eye", f"face {j} eye {e}: pixel {image[y, x]} looks like {got}, not {person.eye_colour}"
            assert landmarks[j, 0, 0] < landmarks[j, 1, 0], "ArcFace order: the left eye (smaller x) first"
            assert landmarks[j, 3, 0] < landmarks[j, 4, 0], "ArcFace order: the left mouth corner first"
            assert landmarks[j, :2, 1].max() < landmarks[j, 2, 1] < landmarks[j, 3:, 1].min(), "eyes above nose above mouth"


def test_render_reference_is_one_large_face():
    synth = SyntheticIdentities(3, seed=0)
    image, box, landmarks = synth.render_reference(2, np.random.default_rng(0), 128)
    assert image.shape == (128, 128, 3) and box.shape == (4,) and landmarks.shape == (5, 2)
    assert box[2] - box[0] > 0.3 * 128, f"reference face too small: box {box.tolist()}"
    assert ((landmarks >= box[:2]) & (landmarks <= box[2:])).all()


def _eye_centroids(crop_255: np.ndarray, person) -> np.ndarray:
    """(2, 2) centroids of the eye-coloured pixels within 12 px of each template eye in a 112 crop."""
    out = []
    for tx, ty in ARCFACE_TEMPLATE[:2]:
        x0, y0 = int(tx) - 12, int(ty) - 12
        window = crop_255[y0:y0 + 25, x0:x0 + 25]
        mask = np.array([[nearest_colour(px, face_colours(person)) == "eye" for px in row] for row in window])
        assert mask.sum() >= 10, f"no iris near the template eye ({tx}, {ty}): {mask.sum()} eye-coloured pixels"
        ys, xs = np.nonzero(mask)
        out.append([xs.mean() + x0, ys.mean() + y0])
    return np.array(out)


def test_face_warp_of_a_rendered_face_is_centred_on_the_template():
    synth = SyntheticIdentities(4, seed=2)
    template = np.asarray(ARCFACE_TEMPLATE)
    for index in range(4):
        person = synth[index]
        image, _, landmarks = synth.render_reference(index, np.random.default_rng(index), 160)
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        crop = face_warp(pixels, torch.from_numpy(landmarks)[None], torch.tensor([0]), value_range=(0.0, 255.0), backend="torch")
        crop_255 = ((crop[0].permute(1, 2, 0).numpy() + 1) * 127.5)
        eyes = _eye_centroids(crop_255, person)
        err = np.linalg.norm(eyes - template[:2], axis=1)
        assert err.max() < 3.0, f"identity {index}: eye pixels centred at {eyes.tolist()}, template {template[:2].tolist()}"


def test_insightface_norm_crop_agrees():
    face_align = pytest.importorskip("insightface.utils.face_align")
    synth = SyntheticIdentities(2, seed=5)
    image, _, landmarks = synth.render_reference(1, np.random.default_rng(3), 160)
    crop = face_align.norm_crop(image, landmarks, image_size=112)  # colour order is irrelevant to the warp
    eyes = _eye_centroids(crop.astype(np.float64), synth[1])
    assert np.linalg.norm(eyes - np.asarray(ARCFACE_TEMPLATE)[:2], axis=1).max() < 3.0, f"norm_crop eyes at {eyes.tolist()}"


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_multiid_layout_and_determinism(tmp_path):
    kwargs = dict(n_identities=5, n_samples=7, size=128, seed=11, shard_size=4, refs_per_identity=2)
    out = write_multiid(tmp_path / "a", **kwargs)
    write_multiid(tmp_path / "b", **kwargs)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), "same arguments must give byte-identical files"
    assert [p.name for p in out["shards"]] == ["000000.tar", "000001.tar"]
    names = out["names"]
    for name in names:
        assert f"ref/{name}.npy" in a and np.load(io.BytesIO(a[f"ref/{name}.npy"])).shape == (512,)
        for r in range(2):
            for ext in ("jpg", "json", "npy"):
                assert f"ref/{name}/{r:04d}.{ext}" in a, f"gallery file ref/{name}/{r:04d}.{ext}"
            ref = np.load(io.BytesIO(a[f"ref/{name}/{r:04d}.npy"]), allow_pickle=True).item()
            assert ref["embeddings"].shape == (1, 512)
            assert json.loads(a[f"ref/{name}/{r:04d}.json"])["bboxes"][0] == pytest.approx(ref["bboxes"][0].tolist())
    synth = SyntheticIdentities(5, seed=11)
    from PIL import Image

    seen = 0
    for shard in out["shards"]:
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        keys = sorted({n.split(".")[0] for n in members})
        for key in keys:
            assert {f"{key}.jpg", f"{key}.json", f"{key}.npy"} <= members.keys()
            meta = json.loads(members[f"{key}.json"])
            npy = np.load(io.BytesIO(members[f"{key}.npy"]), allow_pickle=True).item()
            n = len(npy["bboxes"])
            assert 1 <= n <= 4 and npy["embeddings"].shape == (n, 512) and npy["landmarks"].shape == (n, 5, 2)
            assert meta["names"] == sorted(meta["names"]) and len(meta["names"]) == n and meta["caption_en"]
            x1, y1, x2, y2 = meta["crop"]
            assert Image.open(io.BytesIO(members[f"{key}.jpg"])).size == (x2 - x1, y2 - y1), "the jpg is the crop"
            boxes = npy["bboxes"]
            assert (boxes[:, 0] >= x1).all() and (boxes[:, 2] <= x2).all() and (boxes[:, 1] >= y1).all() and (boxes[:, 3] <= y2).all()
            # Each embedding is near exactly one of the named identities' vectors.
            vectors = np.stack([synth[names.index(nm)].embedding for nm in meta["names"]])
            cos = npy["embeddings"] @ vectors.T / np.linalg.norm(npy["embeddings"], axis=1, keepdims=True)
            assert (cos.max(1) > 0.85).all() and sorted(cos.argmax(1).tolist()) == list(range(n)), f"{key}: cos {cos.round(2)}"
            seen += 1
    assert seen == 7


def test_bad_arguments_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="n_identities"):
        write_multiid(tmp_path, n_identities=2, n_samples=1, max_faces=4)
    with pytest.raises(ValueError, match="size"):
        write_multiid(tmp_path, n_identities=4, n_samples=1, size=16)
    with pytest.raises(ValueError, match="n_identities"):
        SyntheticIdentities(0)
    with pytest.raises(ValueError, match="ids"):
        SyntheticIdentities(2).render_scene(np.random.default_rng(0), [2], 64)


def test_pure_python_fallback_matches_numba(monkeypatch):
    """Without numba the same kernels run as Python: same pixels (run here by swapping in the Python functions)."""
    from idflux.train import synthetic

    if not synthetic.HAS_NUMBA:
        pytest.skip("numba absent: the Python path is the only one")
    synth = SyntheticIdentities(3, seed=9)
    compiled = synth.render_scene(np.random.default_rng(1), [0, 2], (48, 64))
    for name in ("_in_ellipse", "_head_label", "_body_label", "_paint_person", "_paint_background", "_apply_lighting"):
        monkeypatch.setattr(synthetic, name, getattr(synthetic, name).py_func)
    python = synth.render_scene(np.random.default_rng(1), [0, 2], (48, 64))
    for name, x, y in zip(("image", "boxes", "landmarks"), compiled, python):
        assert np.abs(x.astype(np.float64) - y.astype(np.float64)).max() <= 1, f"{name}: numba and Python paths differ"


def test_face_scale_sets_the_head_size_and_is_checked():
    synth = SyntheticIdentities(4, seed=0)
    small = synth.render_scene(np.random.default_rng(3), [0, 1], 192)[1]
    large = synth.render_scene(np.random.default_rng(3), [0, 1], 192, face_scale=0.9)[1]
    width = lambda b: float(np.mean(b[:, 2] - b[:, 0]))  # noqa: E731
    assert width(large) > 1.3 * width(small)
    assert width(large) >= 64  # the tiny world's faces span >= 4 tokens of 16 pixels
    with pytest.raises(ValueError, match="face_scale"):
        synth.render_scene(np.random.default_rng(3), [0], 96, face_scale=1.5)
