"""IResNet: architecture, and the ONNX loader checked against onnxruntime on small exported files."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from idflux.engine.iresnet import IResNet, IResNetConfig, iresnet100, iresnet50, iresnet_tiny

SMALL = IResNetConfig(layers=(2, 1, 2, 1), width=4, embedding_dim=16)  # identity and projected shortcuts


def _random_net(cfg: IResNetConfig = SMALL) -> IResNet:
    """Random weights everywhere, BN statistics included, distinct per layer (so no ONNX dedup)."""
    net = IResNet(cfg).eval()
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
        elif isinstance(m, nn.PReLU):
            m.weight.data.uniform_(0.0, 0.5)
    return net


def _export(net: IResNet, path, **kw) -> None:
    onnx = pytest.importorskip("onnx")  # noqa: F841  (the exporter writes through it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 112, 112),), str(path), dynamo=False, opset_version=13,
                          input_names=["data"], output_names=["embedding"], dynamic_axes={"data": {0: "N"}}, **kw)


def _onnxruntime(path, x: torch.Tensor) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _assert_close(ours: torch.Tensor, ref: np.ndarray, name: str) -> None:
    err = np.abs(ours.detach().numpy() - ref).max()
    scale = max(1.0, np.abs(ref).max())
    assert err <= 1e-4 * scale, f"{name}: max |ours - onnxruntime| = {err:.3g} (output scale {scale:.3g})"


def test_shapes_and_arcface_torch_names():
    net = IResNet(iresnet_tiny()).eval()
    assert net(torch.zeros(3, 3, 112, 112)).shape == (3, 512)
    with torch.device("meta"):
        r100, r50 = IResNet(iresnet100()), IResNet(iresnet50())
    shapes = {k: tuple(v.shape) for k, v in r100.state_dict().items()}
    # arcface_torch's iresnet100 names and shapes (its .pth state dicts load as they are)
    assert shapes["conv1.weight"] == (64, 3, 3, 3) and shapes["prelu.weight"] == (64,)
    assert shapes["layer1.0.downsample.0.weight"] == (64, 64, 1, 1)
    assert shapes["layer3.29.conv2.weight"] == (256, 256, 3, 3) and "layer3.30.bn1.weight" not in shapes
    assert shapes["layer4.2.bn3.running_var"] == (512,)
    assert shapes["fc.weight"] == (512, 512 * 7 * 7) and shapes["features.weight"] == (512,)
    assert 65.0e6 < sum(p.numel() for p in r100.parameters()) < 65.3e6  # glintr100: 65.2 M
    assert len(r50.layer3) == 14
    with pytest.raises(ValueError, match=r"\(N, 3, 112, 112\)"):
        net(torch.zeros(1, 3, 96, 96))


def test_gradient_reaches_the_input():
    net = _random_net().requires_grad_(False)
    x = (torch.rand(2, 3, 112, 112) * 2 - 1).requires_grad_(True)
    net(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, "x.grad"


@pytest.mark.parametrize("mode", ["folded", "unfolded", "no_constant_folding"])
def test_from_onnx_equals_onnxruntime(tmp_path, mode):
    """folded: eval export as insightface made glintr100 (BN after convs folded into conv biases,
    PRelu slopes (C, 1, 1)); unfolded: every BN kept; no_constant_folding: slopes behind Unsqueeze."""
    kw = {"folded": {}, "unfolded": {"training": torch.onnx.TrainingMode.PRESERVE},
          "no_constant_folding": {"do_constant_folding": False}}[mode]
    src = _random_net()
    path = tmp_path / "r.onnx"
    _export(src, path, **kw)
    net = IResNet.from_onnx(path)
    assert net.config.layers == SMALL.layers and net.config.width == 4 and net.config.embedding_dim == 16
    assert net.config.folded_bn == (mode == "folded")
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    _assert_close(net(x), _onnxruntime(path, x), f"embedding ({mode})")


def test_folded_export_has_insightface_layout(tmp_path):
    """What the folded case loads: convs with biases, no BN right after a conv, (C, 1, 1) slopes."""
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "r.onnx"
    _export(_random_net(), path)
    g = onnx.load(str(path)).graph
    inits = {t.name: tuple(t.dims) for t in g.initializer}
    producer = {n.output[0]: n.op_type for n in g.node}
    convs = [n for n in g.node if n.op_type == "Conv"]
    assert convs and all(len(n.input) == 3 for n in convs)
    assert all(producer.get(n.input[0]) != "Conv" for n in g.node if n.op_type == "BatchNormalization")
    slopes = [inits[n.input[1]] for n in g.node if n.op_type == "PRelu" and n.input[1] in inits]
    assert slopes and all(len(s) == 3 and s[1:] == (1, 1) for s in slopes)
    assert [n.op_type for n in g.node][-3:] == ["Flatten", "Gemm", "BatchNormalization"]


def test_matmul_head_variant(tmp_path):
    """A hand-edited graph whose head is MatMul(W^T) + Add(bias) instead of Gemm loads the same."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    path, edited = tmp_path / "r.onnx", tmp_path / "matmul.onnx"
    _export(_random_net(), path)
    model = onnx.load(str(path))
    g = model.graph
    gemm = next(n for n in g.node if n.op_type == "Gemm")
    inits = {t.name: t for t in g.initializer}
    w = numpy_helper.to_array(inits[gemm.input[1]])
    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), "fc_w_t"))
    at = list(g.node).index(gemm)
    mm = helper.make_node("MatMul", [gemm.input[0], "fc_w_t"], ["fc_mm"], name="fc_matmul")
    add = helper.make_node("Add", ["fc_mm", gemm.input[2]], [gemm.output[0]], name="fc_add")
    g.node.remove(gemm)
    g.node.insert(at, add)
    g.node.insert(at, mm)
    onnx.save(model, str(edited))
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    _assert_close(IResNet.from_onnx(edited)(x), _onnxruntime(edited, x), "embedding (MatMul head)")


def test_channel_order_matches_insightface(tmp_path):
    """insightface's own ArcFaceONNX on the same file: BGR uint8 crop in, (x - 127.5) / 127.5 with
    swapRB -> our module takes RGB in [-1, 1]. And the whole path image + landmarks -> embedding:
    its norm_crop + get_feat against our face_warp + IResNet."""
    pytest.importorskip("insightface")
    from insightface.app.common import Face as InsightFace
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    from idflux.kernels import face_warp
    from idflux.kernels.face_warp_ref import arcface_template

    path = tmp_path / "glintr_small.onnx"
    _export(_random_net(), path)
    net = IResNet.from_onnx(path)
    arc = ArcFaceONNX(model_file=str(path))
    arc.prepare(ctx_id=-1)
    assert (arc.input_mean, arc.input_std) == (127.5, 127.5)
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    theirs = arc.get_feat(bgr)[0]
    rgb = torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    ours = net(rgb)[0].numpy()
    assert np.abs(ours - theirs).max() <= 1e-4 * max(1.0, np.abs(theirs).max()), "embedding (ArcFaceONNX.get_feat)"
    swapped = net(rgb.flip(1))[0].numpy()
    assert np.abs(swapped - theirs).max() > 100 * np.abs(ours - theirs).max(), "test cannot tell BGR from RGB"

    # Full path on a smooth image (interpolation differences stay small): a face at 2x scale, shifted.
    yy, xx = np.mgrid[0:240, 0:260].astype(np.float32)
    rgb_img = np.stack([127 + 100 * np.sin(xx / 17), 127 + 100 * np.cos(yy / 23),
                        127 + 90 * np.sin((xx + yy) / 29)], -1)
    rgb_img = rgb_img.round().astype(np.uint8)
    lmk = (arcface_template(112).numpy() * 2 + [20.3, 7.6]).astype(np.float32)
    face = InsightFace(bbox=np.array([20, 8, 244, 232], np.float32), kps=lmk, det_score=0.9)
    theirs = arc.get(np.ascontiguousarray(rgb_img[:, :, ::-1]), face)
    img_t = torch.from_numpy(rgb_img).permute(2, 0, 1)[None].float()
    crop = face_warp(img_t, torch.from_numpy(lmk)[None], torch.tensor([0]), value_range=(0.0, 255.0))
    ours = net(crop)[0].numpy()
    cos = float(ours @ theirs / (np.linalg.norm(ours) * np.linalg.norm(theirs)))
    assert cos > 0.99999, f"embedding via norm_crop vs face_warp: cos = {cos:.5f}"


def test_from_onnx_errors(tmp_path):
    pytest.importorskip("onnx")
    with pytest.raises(FileNotFoundError, match="antelopev2"):
        IResNet.from_onnx(tmp_path / "glintr100.onnx")
    path = tmp_path / "r.onnx"
    _export(_random_net(), path)
    with pytest.raises(ValueError, match=r"tensor '.*' .*conv1\.weight"):
        IResNet.from_onnx(path, config=IResNetConfig(layers=SMALL.layers, width=8, embedding_dim=16))
    with pytest.raises(ValueError, match=r"layers \(2, 1, 2, 1\)"):
        IResNet.from_onnx(path, config=iresnet_tiny())
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated.onnx"):
        IResNet.from_onnx(bad)
    other = tmp_path / "relu.onnx"
    _export(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), other)
    with pytest.raises(ValueError, match="Relu"):
        IResNet.from_onnx(other)
