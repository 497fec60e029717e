"""Face-model interface, the fake recogniser, insightface pack resolution and wrapping, plugin loading."""

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from fake_faces import ColourSquareFaces, draw_faces, hue_rgb
from idflux.eval import (
    DetectedFace,
    FaceModel,
    InsightFaceModel,
    face_embeddings,
    face_metrics,
    load_face_model,
    reference_embedding,
    resolve_insightface_pack,
)

FAKE = Path(__file__).with_name("fake_faces.py")


def test_fake_model_finds_each_square_and_its_hue_is_the_identity():
    model = ColourSquareFaces()
    image, boxes = draw_faces([0.0, 0.33, 0.66])
    faces = model.detect(image)
    assert [list(f.box) for f in faces] == boxes
    embs = face_embeddings(model, image)
    assert embs.shape == (3, 8) and embs.dtype == np.float32
    again = face_embeddings(model, draw_faces([0.66, 0.0])[0])
    m = face_metrics(again, embs, embs)
    assert m["SimGT"] == pytest.approx(1.0, abs=1e-6) and m["match_gt"] == [[0, 2], [1, 0]]
    assert face_embeddings(model, np.full((32, 32, 3), 128, np.uint8)).shape == (0, 0)


def test_reference_embedding_pads_and_takes_the_most_confident_face():
    class TwoFaces(FaceModel):
        name = "two"

        def detect(self, image):
            self.seen = image.shape
            return [DetectedFace((0, 0, 4, 4), 0.6, np.ones(3)), DetectedFace((0, 0, 2, 2), 0.9, np.full(3, 2.0))]

    model = TwoFaces()
    emb = reference_embedding(model, np.zeros((20, 10, 3), np.uint8))
    assert emb.tolist() == [2.0, 2.0, 2.0] and model.seen == (30, 30, 3)  # 1.5x the longer side, black
    assert reference_embedding(ColourSquareFaces(), np.full((16, 16, 3), 128, np.uint8)) is None
    tight = np.zeros((12, 12, 3), np.uint8)
    tight[:] = hue_rgb(0.5)  # a face filling the crop is still found once padded
    assert reference_embedding(ColourSquareFaces(), tight).shape == (8,)


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32), "img.png"])
def test_face_embeddings_rejects_bad_images(bad):
    with pytest.raises(ValueError, match="image"):
        face_embeddings(ColourSquareFaces(), bad)


def _pack(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names or ("det.onnx", "rec.onnx"):
        (folder / name).write_bytes(b"")
    return folder


def test_resolve_insightface_pack_layouts(tmp_path):
    buffalo = _pack(tmp_path / "root" / "models" / "buffalo_l")
    assert resolve_insightface_pack(buffalo) == buffalo
    assert resolve_insightface_pack(tmp_path / "root") == buffalo  # the only pack
    nested = _pack(tmp_path / "root" / "models" / "antelopev2" / "antelopev2")  # antelopev2.zip's extra level
    assert resolve_insightface_pack(tmp_path / "root", "antelopev2") == nested
    assert resolve_insightface_pack(tmp_path / "root") == buffalo  # the released evaluation's pack first
    _pack(tmp_path / "two" / "a")
    _pack(tmp_path / "two" / "b")
    with pytest.raises(ValueError, match="--face-pack"):
        resolve_insightface_pack(tmp_path / "two")


def test_missing_face_model_files_name_the_path_and_the_source(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"face_models: .*nope.*insightface/releases"):
        resolve_insightface_pack(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*buffalo_l.zip"):
        InsightFaceModel(tmp_path / "empty")
    _pack(tmp_path / "r" / "models" / "buffalo_l")
    with pytest.raises(FileNotFoundError, match=r"antelopev2"):
        resolve_insightface_pack(tmp_path / "r", "antelopev2")


def test_insightface_model_wraps_face_analysis_offline_in_bgr(tmp_path, monkeypatch):
    pack = _pack(tmp_path / "models" / "buffalo_l")
    calls = {}

    class FakeFaceAnalysis:
        def __init__(self, name, root, allowed_modules, providers):
            calls.update(name=name, root=root, allowed=allowed_modules, providers=providers)
            self.models = {"detection": object(), "recognition": object()}

        def prepare(self, ctx_id, det_thresh, det_size):
            calls.update(ctx_id=ctx_id, det_thresh=det_thresh, det_size=det_size)

        def get(self, bgr):
            calls["pixel"] = bgr[0, 0].tolist()
            return [types.SimpleNamespace(bbox=np.array([1, 2, 3, 4, 0.9]), det_score=0.9, embedding=np.ones(512))]

    app = types.ModuleType("insightface.app")
    app.FaceAnalysis = FakeFaceAnalysis
    monkeypatch.setitem(sys.modules, "insightface", types.ModuleType("insightface"))
    monkeypatch.setitem(sys.modules, "insightface.app", app)
    model = InsightFaceModel(tmp_path)
    image = np.zeros((4, 4, 3), np.uint8)
    image[0, 0] = (10, 20, 30)
    (face,) = model.detect(image)
    assert calls["pixel"] == [30, 20, 10], "insightface expects BGR"
    assert Path(calls["name"]).is_absolute() and Path(calls["name"]) == pack.resolve()  # never a download
    assert calls["providers"] == ["CPUExecutionProvider"] and calls["ctx_id"] == -1
    assert calls["det_thresh"] == 0.45 and calls["det_size"] == (640, 640) and calls["allowed"] == ["detection", "recognition"]
    assert face.box == (1.0, 2.0, 3.0, 4.0) and face.embedding.shape == (512,) and model.name == "insightface:buffalo_l"


def test_load_face_model_plugins(tmp_path):
    model = load_face_model(f"{FAKE}:ColourSquareFaces")
    assert isinstance(model, FaceModel) and model.name == "fake-colour"
    assert load_face_model("fake_faces:WideColourSquareFaces").dim == 16  # module:NAME on sys.path
    with pytest.raises(ValueError, match="NoSuchModel"):
        load_face_model(f"{FAKE}:NoSuchModel")
    with pytest.raises(ValueError, match="FaceModel"):
        load_face_model(f"{FAKE}:hue_rgb")
    with pytest.raises(FileNotFoundError, match="face_models"):
        load_face_model(str(tmp_path / "no_models_here"))


def test_corrupt_pack_files_are_a_clear_error_with_the_real_insightface(tmp_path):
    pytest.importorskip("insightface")
    _pack(tmp_path / "models" / "buffalo_l", "det_10g.onnx")  # an empty file, as a broken download leaves
    with pytest.raises(ValueError, match=r"face_models: insightface cannot load .*buffalo_l"):
        InsightFaceModel(tmp_path)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["buffalo_l"], "nothing was downloaded"
