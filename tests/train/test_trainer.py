"""Tiny training runs on the CPU: losses, trainable set, exact resume, 2-process gloo == 1 process."""

import json
import os
import socket

import pytest
import torch

pytest.importorskip("diffusers")

from idflux.train.config import Phase, tiny  # noqa: E402
from idflux.train.data_pipeline import build_dataset, collate  # noqa: E402
from idflux.train.model import TrainModel  # noqa: E402
from idflux.train.trainer import read_log, train  # noqa: E402


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from idflux.train.synthetic import write_multiid

    root = tmp_path_factory.mktemp("multiid")
    write_multiid(root, n_identities=8, n_samples=24, size=96, seed=0, shard_size=12, refs_per_identity=2, max_faces=3)
    return str(root)


def small_cfg(out, data_root, **kw):
    cfg = tiny(out=str(out), data=data_root, checkpoint_every=2)
    cfg.phases = [Phase("fixed", 3, "fixed", 0.0, 3e-3), Phase("caption", 3, "caption", 0.5, 3e-3)]
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_losses_finite_and_decreasing_on_a_fixed_batch(tmp_path, data_root):
    cfg = small_cfg(tmp_path, data_root)
    model = TrainModel.build(cfg)
    ds = build_dataset(cfg)
    batch = collate([ds.sample(i, cfg.phases[0]) for i in range(2)], "cpu")
    opt = torch.optim.AdamW(model.adapter.parameters(), lr=3e-3)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("adapter.")}
    before = {k: v.clone() for k, v in model.adapter.state_dict().items()}
    history = []
    for _ in range(12):
        out = model(batch, [11, 12], 99)
        assert all(torch.isfinite(v) for v in out.values()), out
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        history.append(out["loss"].detach().item())
    assert history[-1] < history[0] * 0.9, f"loss did not decrease on a fixed batch: {history}"
    assert set(out) >= {"diff", "id", "cl"}
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), f"frozen tensor {k} changed"
    assert any(not torch.equal(v, before[k]) for k, v in model.adapter.state_dict().items()), "the adapter must train"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"adapter.{n}" for n, _ in model.adapter.named_parameters()}


def test_kill_and_resume_gives_the_same_losses(tmp_path, data_root):
    full = train(small_cfg(tmp_path / "full", data_root))
    part = small_cfg(tmp_path / "part", data_root)
    train(part, max_steps=4)  # "killed" after step 4 (last checkpoint: step 4)
    train(part, resume=True)
    a, b = read_log(full["log"]), read_log(tmp_path / "part" / "log.jsonl")
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for key in ("loss", "diff", "id", "cl"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    ckpt = tmp_path / "part" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000006"
    assert not list(ckpt.glob(".tmp*")), "no half-written checkpoint left"


class _DiesAt:
    """The training data, but asking for sample ``index`` raises (a run killed mid-step)."""

    def __init__(self, dataset, index):
        self.dataset, self.index = dataset, index

    def sample(self, i, phase):
        if i >= self.index:
            raise RuntimeError("killed")
        return self.dataset.sample(i, phase)

    def __getattr__(self, name):
        return getattr(self.dataset, name)


def test_crash_between_checkpoints_then_resume_logs_each_step_once(tmp_path, data_root):
    """Killed in step 6 with the last checkpoint at step 4: the log keeps steps 1-5 (nothing that
    finished is lost), the resume runs 5 and 6 again and the log ends with each step once, equal to
    an uninterrupted run."""
    full = train(small_cfg(tmp_path / "full", data_root))
    cfg = small_cfg(tmp_path / "part", data_root)
    dying = _DiesAt(build_dataset(cfg), 5 * cfg.batch_size)  # the first sample of step 6
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, dataset=dying)
    log = tmp_path / "part" / "log.jsonl"
    assert [r["step"] for r in read_log(log)] == [1, 2, 3, 4, 5]
    assert (tmp_path / "part" / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    train(cfg, resume=True)
    a, b = read_log(full["log"]), read_log(log)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert rb["seconds"] > 0 and rb["grad_norm"] >= 0
        for key in ("loss", "diff", "id", "cl", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)


def test_dataloader_workers_give_the_same_run(tmp_path, data_root):
    """Micro-batches prepared ahead by 2 worker processes: the same losses as in-process loading."""
    a = train(small_cfg(tmp_path / "w0", data_root), max_steps=3)
    b = train(small_cfg(tmp_path / "w2", data_root, num_workers=2), max_steps=3)
    ra, rb = read_log(a["log"]), read_log(b["log"])
    assert [r["step"] for r in rb] == [1, 2, 3]
    for x, y in zip(ra, rb):
        for key in ("loss", "diff", "id", "cl", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-8), (x["step"], key)


def test_skips_met_in_worker_processes_are_counted():
    from idflux.train.config import tiny
    from idflux.train.data_pipeline import micro_batches

    class Flaky:
        """Every third index is skipped once (then a substitute loads), as PhasedDataset reports it."""

        def __init__(self):
            from collections import Counter

            self.skipped = Counter()

        def sample(self, i, phase):
            s = {"index": i}
            if i % 3 == 0:
                s["substituted"] = ["bad_jpeg"]
            return s

    cfg = tiny(out="unused", batch_size=4, num_workers=2)
    ds = Flaky()
    got = [indices for indices, samples in micro_batches(ds, cfg, 1, 4, 0, 4)]
    assert got == [list(range(4 * s, 4 * s + 4)) for s in (1, 2, 3)]
    assert ds.skipped["bad_jpeg"] == len([i for i in range(4, 16) if i % 3 == 0])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out, data_root, shard):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from idflux.train import distributed

    train(small_cfg(out, data_root, shard_backbone=shard), max_steps=3)
    distributed.cleanup()


@pytest.mark.parametrize("shard", [False, True], ids=["ddp", "ddp+fsdp2-backbone"])
def test_two_gloo_processes_match_one_process(tmp_path, data_root, shard):
    import torch.multiprocessing as mp

    single = train(small_cfg(tmp_path / "one", data_root), max_steps=3)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "two"), data_root, shard), nprocs=2, join=True)
    a, b = read_log(single["log"]), read_log(tmp_path / "two" / "log.jsonl")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        # Step 1 starts from identical weights: the global gradient must agree to rounding. Later
        # steps drift a little: AdamW turns rounding-level differences in near-zero gradient
        # coordinates into lr-sized updates (seen: 2e-6, 2e-5, 9e-4 relative over steps 1-3).
        rel = 1e-4 if ra["step"] == 1 else 5e-3
        for key in ("loss", "diff", "id", "cl", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=rel, abs=1e-6), (ra["step"], key, ra[key], rb[key])
    wa = torch.load(tmp_path / "one" / "checkpoints" / "step_00000002" / "state.pt", weights_only=True)["step"]
    assert wa == 2


def test_idflux_train_cli_writes_checkpoint_plot_and_samples(tmp_path, data_root):
    from idflux.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    assert main(["train", "--preset", "tiny", "--data", data_root, "--out", str(tmp_path), "--max-steps", "3"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 3 and summary["skipped_samples"] == {}
    for name in ("loss.png", "samples.png", "log.jsonl"):
        assert (tmp_path / name).stat().st_size > 100, name
    assert (tmp_path / "checkpoints" / "step_00000003" / "adapter.safetensors").is_file()


def test_corrupt_shard_member_is_skipped_and_counted_during_training(tmp_path):
    import tarfile

    from idflux.train.synthetic import write_multiid

    root = tmp_path / "data"
    write_multiid(root, n_identities=6, n_samples=8, size=96, seed=1, shard_size=8, refs_per_identity=1, max_faces=2)
    shard = next((root / "shards").glob("*.tar"))
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for i, (m, data) in enumerate(members):
            if m.name.endswith(".jpg") and i < 3:
                data = data[:40]  # truncated JPEG
            m.size = len(data)
            import io

            tar.addfile(m, io.BytesIO(data))
    cfg = small_cfg(tmp_path / "run", str(root))
    result = train(cfg, max_steps=2)
    assert result["step"] == 2
    assert sum(result["dataset"].skipped.values()) >= 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_step_log_writes_each_line_one_step_late(tmp_path, device):
    from tqdm.auto import tqdm

    from idflux.train.trainer import _StepLog, _StepTimer

    dev = torch.device(device)
    path = tmp_path / "log.jsonl"
    log = _StepLog(path, tqdm(disable=True), dev)
    for step in (1, 2, 3):
        timer = _StepTimer(dev)
        x = torch.full((), float(step), device=dev)
        log.add({"step": step, "phase": "p", "lr": 1e-4}, {"diff": x, "id": 2 * x, "cl": 3 * x, "grad_norm": x.sqrt()}, timer.stop())
        written = read_log(path) if path.exists() else []
        assert [r["step"] for r in written] == list(range(1, step)), "line k is written when step k + 1 is queued"
    log.flush()
    rows = read_log(path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["loss"] for r in rows] == [6.0, 12.0, 18.0] and rows[2]["grad_norm"] == pytest.approx(3 ** 0.5)
    assert all(r["seconds"] >= 0 for r in rows)


def test_workers_stay_off_while_landmarks_are_detected_on_the_fly(data_root):
    from idflux.train.config import tiny
    from idflux.train.data import MultiIDDataset
    from idflux.train.data_pipeline import PhasedDataset, micro_batches

    ds = PhasedDataset(MultiIDDataset(data_root, size=64, ref_size=32, landmark_fn=lambda image: None), "{people}")
    assert not ds.worker_safe
    cfg = tiny(out="unused", batch_size=2, num_workers=2)
    with pytest.warns(UserWarning, match="num_workers=2 ignored"):
        (indices, samples), = micro_batches(ds, cfg, 0, 1, 0, 2)
    assert indices == [0, 1] and len(samples) == 2


def test_train_cli_options_reach_the_config():
    from idflux.cli import build_parser
    from idflux.train.cli import config_from_args

    args = build_parser().parse_args(["train", "--preset", "flux-dev", "--out", "x", "--workers", "0", "--batch-size", "8",
                                      "--grad-accum", "2", "--ema", "0.99", "--seed", "3"])
    cfg = config_from_args(args)
    assert (cfg.preset, cfg.out, cfg.num_workers, cfg.batch_size, cfg.grad_accum, cfg.ema_decay, cfg.seed) == \
        ("flux-dev", "x", 0, 8, 2, 0.99, 3)
    assert config_from_args(build_parser().parse_args(["train", "--preset", "flux-dev"])).num_workers == 4
    assert config_from_args(build_parser().parse_args(["train"])).num_workers == 0


def test_config_round_trip_and_fields_of_another_version():
    import warnings

    from idflux.train.config import TrainConfig

    cfg = tiny(out="x", num_workers=2)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = {**cfg.to_dict(), "log_every": 1}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert TrainConfig.from_dict(old) == cfg
    assert any("log_every" in str(w.message) for w in caught)


def _identity_inputs_per_face(model, batch, dtype):
    """The per-face formulation: one face_warp call per reference, slots filled in a Python loop."""
    from idflux.kernels import face_warp
    from idflux.kernels.face_warp_ref import arcface_template

    crops = []
    for r in batch.ref_images:
        r = torch.from_numpy(r.copy()).permute(2, 0, 1).float()
        lm = (arcface_template(112, dtype=torch.float32) * float(min(r.shape[1:])) / 112)[None]
        crops.append(face_warp(r[None], lm, torch.zeros(1, dtype=torch.long), value_range=(0.0, 255.0)))
    arc = model.recognizer(torch.cat(crops).to(dtype))
    sig = model.siglip(list(batch.ref_images))
    B = batch.images.shape[0]
    R = max(len(b) for b in batch.boxes)
    arc_b = torch.zeros(B, R, arc.shape[-1], dtype=dtype)
    sig_b = torch.zeros(B, R, *sig.shape[1:], dtype=dtype)
    slot = [0] * B
    for f, b in enumerate(batch.image_index.tolist()):
        arc_b[b, slot[b]], sig_b[b, slot[b]] = arc[f], sig[f]
        slot[b] += 1
    return arc_b, sig_b, R


def test_identity_inputs_one_warp_for_all_references_and_no_host_read(tmp_path, data_root):
    from sync_probe import host_syncs

    cfg = small_cfg(tmp_path, data_root)
    model = TrainModel.build(cfg)
    ds = build_dataset(cfg)
    samples = [ds.sample(i, cfg.phases[0]) for i in range(4)]
    assert len({len(s["boxes"]) for s in samples}) > 1, "the batch should mix face counts"
    batch = collate(samples, "cpu")
    with torch.no_grad():
        got = model.identity_inputs(batch, "cpu", torch.float32)
        want = _identity_inputs_per_face(model, batch, torch.float32)
    assert got[2] == want[2]
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    found = host_syncs(lambda: model.identity_inputs(batch, "cpu", torch.float32))
    assert not found, found


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_to_device_copies_values_and_passes_device_tensors_through(device):
    from idflux.engine.lowvram import to_device

    x = torch.arange(12.0).view(3, 4)
    y = to_device(x, device)
    assert y.device.type == device and torch.equal(y.cpu(), x)
    assert to_device(y, device) is y, "already there: no copy"


def test_negative_workers_is_a_clear_error(tmp_path, data_root):
    with pytest.raises(ValueError, match=r"num_workers \(--workers\) must be an int >= 0, got -1"):
        train(small_cfg(tmp_path, data_root, num_workers=-1))
