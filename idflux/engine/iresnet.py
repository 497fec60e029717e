"""The ArcFace recogniser (insightface's IResNet family) as a differentiable PyTorch module.

WithAnyone's identity features come from antelopev2's ``glintr100`` (IResNet-100 trained on
Glint360K); the GT-aligned ID loss needs it differentiable to its input, so :class:`IResNet`
re-implements the architecture of insightface's ``arcface_torch`` backbones and
:meth:`IResNet.from_onnx` loads the released ONNX weights into it.

Architecture (``layers`` = blocks per stage, ``width`` = stem channels, 64 for the released models):
stem conv3x3(3 -> w) + BN + PReLU; four stages of ``IBasicBlock`` with widths w, 2w, 4w, 8w, the
first block of each stage striding 2 (112 -> 56 -> 28 -> 14 -> 7); a block is
BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus a conv1x1(stride) + BN shortcut when
the shape changes; head BN2d -> flatten -> Linear(8w * 7 * 7 -> 512) -> BatchNorm1d(512).
Unfolded parameter names equal ``arcface_torch``'s, so its ``.pth`` state dicts load with
``load_state_dict``. Training-time dropout before the Linear is left out (the module is a frozen
recogniser; insightface exports it as a no-op).

Input convention: (N, 3, 112, 112) **RGB** in [-1, 1], i.e. (x255 - 127.5) / 127.5. That is what
insightface feeds glintr100: ``ArcFaceONNX.get_feat`` calls ``cv2.dnn.blobFromImages(img, 1/127.5,
size, (127.5,) * 3, swapRB=True)`` on its BGR ``norm_crop``, so the network itself sees RGB.
:func:`idflux.kernels.face_warp` produces exactly this from RGB images. Output: the raw
(not L2-normalised) embedding, insightface's ``face.embedding``.

ONNX layouts: insightface exported its PyTorch backbones with ``torch.onnx.export`` in eval mode,
which folds each BN that follows a conv into that conv (weights scaled, bias added) and keeps the
BNs that follow a PReLU or an Add (each block's first BN, the head's BN2d) and the BatchNorm1d after
the Gemm; PReLU slopes are stored as (C, 1, 1). An unfolded export keeps every BN. The module is
built in the file's layout (``IResNetConfig.folded_bn``: convs with bias and no BN after them) so
both load exactly, without re-folding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

#: Where glintr100.onnx comes from.
ANTELOPEV2_SOURCE = ("insightface's antelopev2 model pack (https://github.com/deepinsight/insightface/releases, "
                     "antelopev2.zip; unzip to <root>/models/antelopev2/)")


@dataclass(frozen=True)
class IResNetConfig:
    """Sizes and layout of an IResNet recogniser."""

    layers: tuple[int, int, int, int] = (3, 13, 30, 3)
    """Blocks per stage ((3, 13, 30, 3) = iresnet100, (3, 4, 14, 3) = iresnet50)."""
    width: int = 64
    """Stem channels; the stages have width * (1, 2, 4, 8)."""
    embedding_dim: int = 512
    """Output embedding size."""
    input_size: int = 112
    """Input side in pixels (a multiple of 16; the head flattens (input_size / 16)^2 positions)."""
    folded_bn: bool = False
    """Layout of a BN-folded export: convs carry a bias and the BN after each conv is absent."""
    bn_eps: float = 1e-5
    """BatchNorm epsilon (``from_onnx`` sets each BN's from the file)."""
    downsample: int = 1
    """Average-pool the input by this factor before the stem (1 for the released models; the tiny
    world's recogniser reads the 112-pixel crops at 56 pixels, a quarter of the cost)."""


def iresnet100(**overrides) -> IResNetConfig:
    """glintr100 (antelopev2's recogniser): layers (3, 13, 30, 3), width 64, 512-d, 65.2 M parameters."""
    return replace(IResNetConfig(), **overrides)


def iresnet50(**overrides) -> IResNetConfig:
    """w600k_r50 / glint r50: layers (3, 4, 14, 3), width 64, 512-d."""
    return replace(IResNetConfig(layers=(3, 4, 14, 3)), **overrides)


def iresnet_tiny(**overrides) -> IResNetConfig:
    """A random-weights stand-in for tests and the tiny engine preset: one block per stage, width 8."""
    return replace(IResNetConfig(layers=(1, 1, 1, 1), width=8), **overrides)


def _conv(cin: int, cout: int, kernel: int, stride: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=bias)


def _bn(channels: int, cfg: IResNetConfig) -> nn.Module:
    """The BN that follows a conv: absent in a folded layout (the conv's bias holds it)."""
    return nn.Identity() if cfg.folded_bn else nn.BatchNorm2d(channels, eps=cfg.bn_eps)


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the (projected) input."""

    def __init__(self, cin: int, cout: int, stride: int, cfg: IResNetConfig):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=cfg.bn_eps)
        self.conv1 = _conv(cin, cout, 3, 1, cfg.folded_bn)
        self.bn2 = _bn(cout, cfg)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv(cout, cout, 3, stride, cfg.folded_bn)
        self.bn3 = _bn(cout, cfg)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(_conv(cin, cout, 1, stride, cfg.folded_bn), _bn(cout, cfg))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """ArcFace IResNet: (N, 3, S, S) RGB in [-1, 1] -> (N, embedding_dim) raw embeddings.

    Args:
        config: :class:`IResNetConfig` (presets :func:`iresnet100`, :func:`iresnet50`, :func:`iresnet_tiny`).

    Random weights unless loaded (:meth:`from_onnx`, or ``load_state_dict`` of an arcface_torch
    checkpoint for an unfolded config). Differentiable in its input; any float dtype.

    Example:
        >>> net = IResNet(iresnet_tiny()).eval()
        >>> net(torch.zeros(2, 3, 112, 112)).shape
        torch.Size([2, 512])
    """

    def __init__(self, config: IResNetConfig | None = None):
        super().__init__()
        cfg = self.config = config or IResNetConfig()
        if len(cfg.layers) != 4 or min(cfg.layers) < 1:
            raise ValueError(f"IResNet: layers={cfg.layers!r} must be four block counts >= 1, e.g. (3, 13, 30, 3)")
        if cfg.input_size % 16 or cfg.input_size < 16:
            raise ValueError(f"IResNet: input_size={cfg.input_size} must be a positive multiple of 16 "
                             "(112 for ArcFace)")
        if cfg.downsample < 1 or cfg.input_size % cfg.downsample:
            raise ValueError(f"IResNet: downsample={cfg.downsample} must be a divisor of input_size={cfg.input_size}")
        w = cfg.width
        self.conv1 = _conv(3, w, 3, 1, cfg.folded_bn)
        self.bn1 = _bn(w, cfg)
        self.prelu = nn.PReLU(w)
        cin = w
        for i, (blocks, cout) in enumerate(zip(cfg.layers, (w, 2 * w, 4 * w, 8 * w)), start=1):
            stage = [IBasicBlock(cin, cout, 2, cfg)] + [IBasicBlock(cout, cout, 1, cfg) for _ in range(blocks - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*stage))
            cin = cout
        self.bn2 = nn.BatchNorm2d(cin, eps=cfg.bn_eps)
        side = -(-(cfg.input_size // cfg.downsample) // 16)  # each stride-2 stage rounds up
        self.fc = nn.Linear(cin * side ** 2, cfg.embedding_dim)
        self.features = nn.BatchNorm1d(cfg.embedding_dim, eps=cfg.bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.config.input_size
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != s or x.shape[3] != s:
            raise ValueError(f"IResNet: input must be (N, 3, {s}, {s}) RGB in [-1, 1] (aligned crops from "
                             f"idflux.kernels.face_warp), got {tuple(x.shape)}")
        if self.config.downsample > 1:
            x = torch.nn.functional.avg_pool2d(x, self.config.downsample)
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(torch.flatten(self.bn2(x), 1)))

    @classmethod
    def from_onnx(cls, path, config: IResNetConfig | None = None) -> "IResNet":
        """Load an insightface IResNet ONNX file (antelopev2's ``glintr100.onnx``).

        The architecture (layers, width, embedding size, input size) and the layout (BN folded into
        the convs or not) are read from the graph; a given ``config`` is checked against the file
        (its ``folded_bn`` is taken from the file). Initialisers are matched to parameters by walking
        the graph's Conv / BatchNormalization / PRelu / Gemm nodes (or MatMul + Add) in order, each
        BN's epsilon taken from the node. Returns the module in eval mode with frozen parameters
        (gradients still flow to the input), float32 on the CPU.

        Raises FileNotFoundError for a missing file (naming where it comes from), ValueError for a
        graph that is not an IResNet or a tensor whose shape does not fit (naming the tensor).

        Example:
            >>> net = IResNet.from_onnx("models/antelopev2/glintr100.onnx")  # doctest: +SKIP
            >>> net(face_warp(images, landmarks, index, value_range=(0.0, 255.0)))  # doctest: +SKIP
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"IResNet.from_onnx: {path} does not exist; glintr100.onnx comes from "
                                    f"{ANTELOPEV2_SOURCE}")
        graph = _OnnxIResNet(path)
        found = graph.config()
        if config is None:
            config = found
        else:
            config = replace(config, folded_bn=found.folded_bn)
            if tuple(config.layers) != found.layers:
                raise ValueError(f"IResNet.from_onnx: {path} has layers {found.layers}, the given config "
                                 f"{tuple(config.layers)}; pass config=None to read it from the file")
        net = cls(config)
        graph.load_into(net)
        return net.eval().requires_grad_(False)

    def _onnx_slots(self) -> tuple[list[tuple[str, str, nn.Module]], list[tuple[str, str, nn.Module]]]:
        """(main path, shortcuts): (kind, name, module) in forward order, kind in conv / bn / prelu / fc.

        A conv slot's module is ``(conv, following BN or Identity)``; shortcuts are the stages'
        conv1x1 projections. This is the order :meth:`from_onnx` expects the graph's nodes in.
        """
        main: list = [("conv", "conv1", (self.conv1, self.bn1)), ("prelu", "prelu", self.prelu)]
        shortcuts: list = []
        for i in range(1, 5):
            for j, block in enumerate(getattr(self, f"layer{i}")):
                name = f"layer{i}.{j}"
                main += [("bn", f"{name}.bn1", block.bn1), ("conv", f"{name}.conv1", (block.conv1, block.bn2)),
                         ("prelu", f"{name}.prelu", block.prelu), ("conv", f"{name}.conv2", (block.conv2, block.bn3))]
                if block.downsample is not None:
                    shortcuts.append(("conv", f"{name}.downsample", tuple(block.downsample)))
        main += [("bn", "bn2", self.bn2), ("fc", "fc", self.fc), ("bn", "features", self.features)]
        return main, shortcuts


# ------------------------------------------------------------------------------------- ONNX reading

# Ops that carry no parameters: shape plumbing around flatten / constants, no-op dropout, residual Add.
_STRUCTURAL = {"Flatten", "Reshape", "Identity", "Dropout", "Shape", "Gather", "Concat", "Unsqueeze", "Squeeze",
               "Cast", "Constant", "Add"}
# Ops that only reshape their first input: a constant stays a constant (same values, same order).
_SHAPE_ONLY = {"Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten"}


@dataclass
class _Item:
    kind: str               # conv / bn / prelu / fc
    node: str               # node name (or op + index) for messages
    tensors: dict           # role -> (initializer name, np.ndarray)
    attrs: dict
    post_bn: "_Item | None" = None


class _OnnxIResNet:
    """An IResNet ONNX graph parsed into parameter-carrying items, in node order."""

    def __init__(self, path: Path):
        try:
            import onnx
            from onnx import numpy_helper
        except ImportError as exc:
            raise ImportError("IResNet.from_onnx needs the onnx package: pip install onnx") from exc
        self.path = path
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # protobuf DecodeError and friends
            raise ValueError(f"IResNet.from_onnx: {path} is not a readable ONNX file ({exc}); download it again "
                             f"from {ANTELOPEV2_SOURCE}") from exc
        g = model.graph
        consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        producer: dict[str, _Item] = {}
        self.main: list[_Item] = []
        self.shortcuts: list[_Item] = []
        fc_pending: _Item | None = None
        for idx, node in enumerate(g.node):
            op, label = node.op_type, f"{node.op_type} node {node.name or idx!r}"
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            ins = [i for i in node.input]

            def const(name, role, _label=label):
                if name not in consts:
                    raise ValueError(f"IResNet.from_onnx: {path}: the {role} of {_label} ({name!r}) is not a "
                                     "constant; not an insightface IResNet export")
                return name, consts[name]

            if op == "Constant":
                consts[node.output[0]] = numpy_helper.to_array(attrs["value"])
            elif op in _SHAPE_ONLY and ins and ins[0] in consts:
                consts[node.output[0]] = consts[ins[0]]
            elif op == "Conv":
                tensors = {"weight": const(ins[1], "weight")}
                if len(ins) > 2 and ins[2]:
                    tensors["bias"] = const(ins[2], "bias")
                item = _Item("conv", label, tensors, attrs)
                (self.shortcuts if tuple(tensors["weight"][1].shape[2:]) == (1, 1) else self.main).append(item)
                producer[node.output[0]] = item
            elif op == "BatchNormalization":
                tensors = {r: const(n, r) for r, n in zip(("weight", "bias", "running_mean", "running_var"), ins[1:5])}
                item = _Item("bn", label, tensors, attrs)
                src = producer.get(ins[0])
                if src is not None and src.kind == "conv":
                    if src.post_bn is not None:
                        raise ValueError(f"IResNet.from_onnx: {path}: two BatchNormalization nodes follow {src.node}")
                    src.post_bn = item
                else:
                    self.main.append(item)
                producer[node.output[0]] = item
            elif op == "PRelu":
                item = _Item("prelu", label, {"weight": const(ins[1], "slope")}, attrs)
                self.main.append(item)
                producer[node.output[0]] = item
            elif op == "Gemm":
                if attrs.get("transA", 0):
                    raise ValueError(f"IResNet.from_onnx: {path}: {label} has transA=1; not an IResNet head")
                name, w = const(ins[1], "weight")
                w = w if attrs.get("transB", 0) else w.T
                tensors = {"weight": (name, w * attrs.get("alpha", 1.0))}
                if len(ins) > 2 and ins[2]:
                    name, b = const(ins[2], "bias")
                    tensors["bias"] = (name, b * attrs.get("beta", 1.0))
                item = _Item("fc", label, tensors, attrs)
                self.main.append(item)
                producer[node.output[0]] = item
            elif op == "MatMul":
                name, w = const(ins[1], "weight")
                item = fc_pending = _Item("fc", label, {"weight": (name, w.T)}, attrs)
                self.main.append(item)
                producer[node.output[0]] = item
            elif op == "Add" and fc_pending is not None and any(producer.get(i) is fc_pending for i in ins):
                bias = [i for i in ins if i in consts]
                if len(bias) != 1:
                    raise self._fail(f"{label} after the MatMul head adds no constant bias")
                fc_pending.tensors["bias"] = (bias[0], consts[bias[0]])
                producer[node.output[0]] = fc_pending
                fc_pending = None
            elif op in ("Sub", "Mul", "Div") and idx < 8:
                raise ValueError(f"IResNet.from_onnx: {path} normalises its input inside the graph ({label}): an "
                                 "mxnet-converted recogniser (insightface feeds those 0..255); only PyTorch-exported "
                                 "IResNets such as glintr100.onnx are supported")
            elif op not in _STRUCTURAL:
                raise ValueError(f"IResNet.from_onnx: {path}: unexpected {label}; not an insightface IResNet graph "
                                 "(Conv, BatchNormalization, PRelu, Add, Flatten, Gemm)")

    def _fail(self, what: str) -> ValueError:
        return ValueError(f"IResNet.from_onnx: {self.path}: {what}; not an insightface IResNet graph")

    def config(self) -> IResNetConfig:
        """The architecture and layout the graph holds."""
        kinds = [it.kind for it in self.main]
        head, tail = kinds[:2], kinds[-3:]
        if head != ["conv", "prelu"] or tail != ["bn", "fc", "bn"] or len(kinds) < 21 or (len(kinds) - 5) % 4:
            raise self._fail(f"parameter nodes in order {kinds[:8]}...{kinds[-4:]}, expected conv, prelu, "
                             "(bn, conv, prelu, conv) per block, bn, fc (Gemm), bn")
        n_blocks = (len(kinds) - 5) // 4
        for b in range(n_blocks):
            got = kinds[2 + 4 * b: 6 + 4 * b]
            if got != ["bn", "conv", "prelu", "conv"]:
                raise self._fail(f"block {b} has parameter nodes {got}, expected bn, conv, prelu, conv")
        strides = [tuple(self.main[5 + 4 * b].attrs.get("strides", (1, 1))) for b in range(n_blocks)]
        starts = [b for b, s in enumerate(strides) if s != (1, 1)]
        if len(starts) != 4 or starts[0] != 0 or any(s != (2, 2) for s in (strides[b] for b in starts)):
            raise self._fail(f"block strides {strides}; expected four stages each opened by a stride-2 block")
        if len(self.shortcuts) != 4:
            raise self._fail(f"{len(self.shortcuts)} conv1x1 shortcuts, expected 4 (one per stage)")
        layers = tuple(b - a for a, b in zip(starts, starts[1:] + [n_blocks]))
        convs = [it for it in self.main if it.kind == "conv"] + self.shortcuts
        with_bn = [it.post_bn is not None for it in convs]
        with_bias = ["bias" in it.tensors for it in convs]
        if all(with_bias) and not any(with_bn):
            folded = True
        elif not any(with_bias) and all(with_bn):
            folded = False
        else:
            raise self._fail("some convs are followed by a BatchNormalization and others carry a bias (a mixed "
                             "BN-folding layout)")
        width = self.main[0].tensors["weight"][1].shape[0]
        fc_out, fc_in = self.main[-2].tensors["weight"][1].shape
        side = math.isqrt(max(fc_in // (8 * width), 0))
        if side < 1 or 8 * width * side * side != fc_in:
            raise self._fail(f"the Gemm takes {fc_in} features, not 8 * {width} * side^2")
        return IResNetConfig(layers=layers, width=int(width), embedding_dim=int(fc_out), input_size=16 * side,
                             folded_bn=folded, bn_eps=float(self.main[2].attrs.get("epsilon", 1e-5)))

    def load_into(self, net: IResNet) -> None:
        """Copy every initialiser into ``net`` (built in the graph's layout), checking each shape."""
        main, shortcuts = net._onnx_slots()
        for slots, items, where in ((main, self.main, "main path"), (shortcuts, self.shortcuts, "shortcuts")):
            if len(slots) != len(items):
                raise self._fail(f"{len(items)} parameter nodes on the {where}, the module has {len(slots)}")
            for (kind, name, module), item in zip(slots, items):
                if kind != item.kind:
                    raise self._fail(f"{item.node} is a {item.kind} where {name} expects a {kind}")
                if kind == "conv":
                    conv, bn = module
                    self._check_conv(item, conv, name)
                    self._copy(item, "weight", conv.weight, f"{name}.weight")
                    if conv.bias is not None:
                        self._copy(item, "bias", conv.bias, f"{name}.bias")
                    if item.post_bn is not None:
                        self._load_bn(item.post_bn, bn, f"{name} BN")
                elif kind == "bn":
                    self._load_bn(item, module, name)
                elif kind == "prelu":
                    _, slope = item.tensors["weight"]
                    if slope.size == 1:  # one shared slope broadcasts over the channels
                        slope = np.full(module.weight.shape, slope.reshape(()), dtype=slope.dtype)
                    elif slope.size == module.weight.numel() and sum(d != 1 for d in slope.shape) <= 1:
                        slope = slope.reshape(module.weight.shape)  # (C, 1, 1) as exported -> (C,)
                    self._copy(item, "weight", module.weight, f"{name}.weight", value=slope)
                else:
                    self._copy(item, "weight", module.weight, f"{name}.weight")
                    if "bias" not in item.tensors:
                        raise self._fail(f"{item.node} has no bias")
                    self._copy(item, "bias", module.bias, f"{name}.bias")

    def _check_conv(self, item: _Item, conv: nn.Conv2d, name: str) -> None:
        k = conv.kernel_size[0]
        want = {"strides": list(conv.stride), "pads": [k // 2] * 4, "group": 1, "dilations": [1, 1]}
        got = {"strides": list(item.attrs.get("strides", [1, 1])), "pads": list(item.attrs.get("pads", [0] * 4)),
               "group": item.attrs.get("group", 1), "dilations": list(item.attrs.get("dilations", [1, 1]))}
        if got != want:
            raise self._fail(f"{item.node} ({name}) has {got}, expected {want}")

    def _load_bn(self, item: _Item, bn: nn.Module, name: str) -> None:
        for role in ("weight", "bias", "running_mean", "running_var"):
            self._copy(item, role, getattr(bn, role), f"{name}.{role}")
        bn.eps = float(item.attrs.get("epsilon", 1e-5))

    def _copy(self, item: _Item, role: str, target: torch.Tensor, name: str, value: np.ndarray | None = None) -> None:
        tensor_name, array = item.tensors[role]
        array = array if value is None else value
        if tuple(array.shape) != tuple(target.shape):
            raise ValueError(f"IResNet.from_onnx: {self.path}: tensor {tensor_name!r} ({role} of {item.node}) has "
                             f"shape {tuple(item.tensors[role][1].shape)}, but {name} needs {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(torch.from_numpy(np.array(array, dtype=np.float32)))
