"""Faces: the square crop rule, the insightface wrapper (error paths, conventions), stand-ins, SigLIP."""

from pathlib import Path

import numpy as np
import pytest
import torch

from idflux.engine.faces import (
    ANTELOPEV2_FILES, CenterFaceDetector, FaceDetector, SiglipFaceEncoder, encode_references,
    resolve_antelopev2, square_face_crop, tiny_face_models,
)
from idflux.engine.iresnet import IResNet, iresnet_tiny
from idflux.kernels.face_warp_ref import arcface_template


def _coded_image(h=100, w=120):
    """Each pixel tells its position: R = x, G = y, B = x + y (mod 256)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx, yy, xx + yy], -1).astype(np.uint8)


# ------------------------------------------------------------------------------------ square crop

@pytest.mark.parametrize("box,square", [
    ((10.7, 20.2, 50.9, 40.0), (10, 10, 50, 50)),  # int() first; wide box: rows grow by 20, 10 above
    ((10, 20, 51, 40), (10, 10, 51, 51)),          # odd difference 21: 10 above, 11 below
    ((30, 5, 40, 45), (15, 5, 55, 45)),            # tall box: columns grow
    ((20, 20, 40, 40), (20, 20, 40, 40)),          # already square
])
def test_square_crop_released_rule(box, square):
    img = _coded_image()
    x1, y1, x2, y2 = square
    crop = square_face_crop(img, box, out_size=x2 - x1)  # same size: the resize is the identity
    np.testing.assert_array_equal(crop, img[y1:y2, x1:x2], err_msg=f"crop of {box}")


def test_square_crop_border_expand_and_resize():
    img = _coded_image()
    # (0, 0, 20, 10) grows to rows -5..15: "clip" (released) cuts rows 0..15 and stretches them ...
    clipped = square_face_crop(img, (0, 0, 20, 10), out_size=20)
    assert clipped.shape == (20, 20, 3) and clipped[:, :, 1].max() <= 15 and clipped[0, 0, 1] == 0
    # ... "pad" keeps the square and fills the 5 rows above the image with black.
    padded = square_face_crop(img, (0, 0, 20, 10), out_size=20, border="pad")
    assert (padded[:5] == 0).all(), "pad rows"
    np.testing.assert_array_equal(padded[5:], img[0:15, 0:20], err_msg="padded crop")
    np.testing.assert_array_equal(square_face_crop(img, (20, 20, 40, 40), out_size=40, expand=2.0), img[10:50, 10:50])
    big = square_face_crop(img, (20, 20, 40, 40))
    assert big.shape == (512, 512, 3) and big.dtype == np.uint8
    assert abs(int(big[256, 256, 0]) - 30) <= 1, "upscaled centre keeps its colour"


@pytest.mark.parametrize("kw,match", [
    (dict(box=(10, 10, 10, 30)), "empty"),
    (dict(box=(500, 500, 600, 600)), "outside"),
    (dict(box=(0, 0, 10)), "four numbers"),
    (dict(box=(0, 0, 10, 10), border="reflect"), "border"),
    (dict(box=(0, 0, 10, 10), expand=0), "expand"),
    (dict(box=(0, 0, 10, 10), out_size=0), "out_size"),
])
def test_square_crop_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        square_face_crop(_coded_image(), **kw)
    with pytest.raises(ValueError, match="uint8"):
        square_face_crop(_coded_image().astype(np.float32), (0, 0, 10, 10))


# ------------------------------------------------------------------------------- insightface wrapper

def test_face_detector_missing_files(tmp_path):
    for path in (tmp_path, tmp_path / "nowhere"):
        with pytest.raises(FileNotFoundError) as err:
            FaceDetector(path)
        msg = str(err.value)
        assert all(f in msg for f in ANTELOPEV2_FILES) and "antelopev2" in msg and "insightface" in msg, msg
    pack = tmp_path / "models" / "antelopev2"
    pack.mkdir(parents=True)
    (pack / "scrfd_10g_bnkps.onnx").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"lacks \['glintr100.onnx'\]"):
        FaceDetector(tmp_path)


def test_face_detector_corrupt_files_real_insightface(tmp_path):
    """Real FaceAnalysis on empty .onnx files: a clear error, nothing fetched or written."""
    pytest.importorskip("insightface.app")
    pack = tmp_path / "antelopev2"
    pack.mkdir()
    for f in ANTELOPEV2_FILES:
        (pack / f).write_bytes(b"")
    with pytest.raises(ValueError, match="cannot load the .onnx files"):
        FaceDetector(tmp_path, providers=["CPUExecutionProvider"])
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["antelopev2", *ANTELOPEV2_FILES])


class _FakeModel:
    def __init__(self, model_file):
        self.model_file = model_file


class _FakeAnalysis:
    """Stands in for insightface.app.FaceAnalysis: records how it is built and what it is fed."""

    built: dict = {}

    def __init__(self, name, root, allowed_modules=None, **kwargs):
        from insightface.app.common import Face as InsightFace

        self.Face = InsightFace
        _FakeAnalysis.built = dict(name=name, root=root, allowed_modules=allowed_modules, **kwargs)
        self.models = {"detection": _FakeModel(str(Path(name) / "scrfd_10g_bnkps.onnx")),
                       "recognition": _FakeModel(str(Path(name) / "glintr100.onnx"))}

    def prepare(self, ctx_id, det_thresh, det_size):
        _FakeAnalysis.built.update(ctx_id=ctx_id, det_thresh=det_thresh, det_size=det_size)

    def get(self, img):
        _FakeAnalysis.built["image"] = img
        kps = arcface_template(112).numpy().astype(np.float32)
        # insightface orders by detector score: the right face first here
        return [self.Face(bbox=np.array([60, 5, 100, 50, 0.9], np.float32)[:4], kps=kps + 50, det_score=0.9,
                          embedding=np.full(512, 3.0, np.float32)),
                self.Face(bbox=np.array([2, 8, 40, 60], np.float32), kps=kps, det_score=0.7,
                          embedding=np.arange(512, dtype=np.float32)),
                self.Face(bbox=np.array([0, 0, 5, 5], np.float32), kps=kps, det_score=0.5, embedding=None)]


def test_face_detector_wraps_insightface(tmp_path, monkeypatch):
    insightface_app = pytest.importorskip("insightface.app")
    pack = tmp_path / "models" / "antelopev2"
    pack.mkdir(parents=True)
    for f in ANTELOPEV2_FILES:
        (pack / f).write_bytes(b"")
    monkeypatch.setattr(insightface_app, "FaceAnalysis", _FakeAnalysis)
    det = FaceDetector(tmp_path, providers=["CPUExecutionProvider"])
    built = _FakeAnalysis.built
    # an absolute existing folder as the pack name: insightface uses it and downloads nothing
    assert Path(built["name"]).is_absolute()
    assert Path(built["name"]) == pack.resolve() == resolve_antelopev2(tmp_path).resolve()
    assert built["allowed_modules"] == ["detection", "recognition"] and built["providers"] == ["CPUExecutionProvider"]
    assert (built["ctx_id"], built["det_thresh"], built["det_size"]) == (-1, 0.4, (640, 640))
    rgb = _coded_image()
    faces = det.detect(rgb)
    np.testing.assert_array_equal(built["image"], rgb[:, :, ::-1], err_msg="insightface must get BGR")
    assert [f.box[0] for f in faces] == [2.0, 60.0], "sorted by x1; faces without embedding dropped"
    assert faces[0].landmarks.shape == (5, 2) and faces[0].embedding.dtype == np.float32
    np.testing.assert_array_equal(faces[0].embedding, np.arange(512), err_msg="raw embedding, not normalised")
    assert det.reference_face(rgb).score == pytest.approx(0.9)


# --------------------------------------------------------------------------------------- stand-ins

def test_center_face_detector():
    torch.manual_seed(0)
    recognizer = IResNet(iresnet_tiny(embedding_dim=32)).eval()
    det = CenterFaceDetector(recognizer)
    (face,) = det.detect(np.zeros((60, 100, 3), np.uint8))
    assert face.box == (20.0, 0.0, 80.0, 60.0) and face.score == 1.0
    np.testing.assert_allclose(face.landmarks, arcface_template(112).numpy() * 60 / 112 + [20, 0], atol=1e-4)
    # a 112 x 112 image: the aligned crop is the image itself, normalised to [-1, 1] RGB
    img = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    (face,) = det.detect(img)
    with torch.no_grad():
        want = recognizer(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1)[0].numpy()
    np.testing.assert_allclose(face.embedding, want, rtol=1e-4, atol=1e-4, err_msg="embedding")
    assert face.embedding.shape == (32,) and face.embedding.dtype == np.float32


def test_tiny_face_models_and_encode_references():
    state = torch.random.get_rng_state()
    det, enc = tiny_face_models(seed=3)
    assert torch.equal(state, torch.random.get_rng_state()), "tiny_face_models must not move the global RNG"
    rng = np.random.default_rng(1)
    refs = [rng.integers(0, 256, (80, 64, 3), dtype=np.uint8) for _ in range(3)]
    arc, sig = encode_references(refs, det, enc)
    assert arc.shape == (3, 32) and arc.dtype == torch.float32 and sig.shape == (3, 16, 24)
    arc2, sig2 = encode_references(refs, *tiny_face_models(seed=3))
    assert torch.equal(arc, arc2) and torch.equal(sig, sig2), "same seed, same stand-ins"
    assert not torch.equal(arc[0], arc[1]), "different references, different embeddings"
    assert encode_references(refs[:1], det)[1] is None
    with pytest.raises(ValueError, match="empty"):
        encode_references([], det)


class _SecondEmpty(CenterFaceDetector):
    """Finds the centred face in the first image only."""

    calls = 0

    def detect(self, image):
        self.calls += 1
        return super().detect(image) if self.calls == 1 else []


def test_reference_without_face():
    det, _ = tiny_face_models()
    with pytest.raises(ValueError, match="reference image 1: no face"):
        encode_references([np.zeros((8, 8, 3), np.uint8)] * 2, _SecondEmpty(det.recognizer))


# ------------------------------------------------------------------------------------------- SigLIP

def _save_tiny_siglip(folder: Path, layers: int = 1):
    """A full SiglipModel checkpoint (text + vision towers, as the i18n repo) + its processor."""
    transformers = pytest.importorskip("transformers")
    from idflux.engine.faces import _siglip_processor_class

    cfg = transformers.SiglipConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, max_position_embeddings=8, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
                           image_size=32, patch_size=16))
    model = transformers.SiglipModel(cfg).eval()
    model.save_pretrained(str(folder))
    _siglip_processor_class()(size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return model


def test_siglip_encoder_loads_local_folder(tmp_path):
    full = _save_tiny_siglip(tmp_path / "siglip")
    enc = SiglipFaceEncoder.from_pretrained(tmp_path / "siglip")
    assert (enc.num_tokens, enc.hidden_size) == (4, 16)
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(3)]
    out = enc(crops)
    assert out.shape == (3, 4, 16) and not out.requires_grad
    pixels = enc.processor(images=crops, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (3, 3, 32, 32) and -1 <= pixels.min() and pixels.max() <= 1
    with torch.no_grad():
        want = full.vision_model(pixel_values=pixels).last_hidden_state  # the released SiglipModel(...).vision_model
    torch.testing.assert_close(out, want, msg="last_hidden_state")
    boxes = [(4, 4, 30, 20), (10, 0, 40, 40)]
    img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    torch.testing.assert_close(enc.encode_faces(img, boxes), enc([square_face_crop(img, b) for b in boxes]))


def test_siglip_encoder_offline_guard(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(FileNotFoundError, match=r"nowhere.*google/siglip-base-patch16-256-i18n"):
        SiglipFaceEncoder.from_pretrained(tmp_path / "nowhere")
    folder = tmp_path / "siglip"
    _save_tiny_siglip(folder)
    (folder / "model.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        SiglipFaceEncoder.from_pretrained(folder)
    (tmp_path / "moved.safetensors").rename(folder / "model.safetensors")
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        SiglipFaceEncoder.from_pretrained(folder)
    # a checkpoint with fewer vision layers than its config: no silent random init
    two = tmp_path / "two"
    _save_tiny_siglip(two, layers=1)
    import json
    cfg = json.loads((two / "config.json").read_text())
    cfg["vision_config"]["num_hidden_layers"] = 2
    (two / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="lacks"):
        SiglipFaceEncoder.from_pretrained(two)
