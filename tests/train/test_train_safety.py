"""Nothing lost, nothing executed (issue 15) and the training config file (issue 14, item 6):
crafted checkpoint state never runs, resume takes the newest valid checkpoint or stops naming the
problem, run folders are locked and never silently replaced, a full disk is reported with the last
checkpoint intact, synthetic data only where asked (and on rank 0 under torchrun), every option
validated before any work, adapter files in idflux's format, config files with CLI overrides."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

pytest.importorskip("diffusers")

from idflux.train import config as C  # noqa: E402
from idflux.train.checkpoint import (CheckpointError, RunFolderError, load_checkpoint, prepare_run_folder,  # noqa: E402
                                     run_lock, save_checkpoint)
from idflux.train.config import Phase, tiny  # noqa: E402
from idflux.train.trainer import read_log, train  # noqa: E402


class WritesMarker:
    """Unpickling this with the full pickle module would create ``path`` (the code a crafted file runs)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('ran')",))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from idflux.train.synthetic import write_multiid

    root = tmp_path_factory.mktemp("multiid")
    write_multiid(root, n_identities=6, n_samples=12, size=96, seed=0, shard_size=12, refs_per_identity=1, max_faces=2)
    return str(root)


def small_cfg(out, data_root, **kw):
    cfg = tiny(out=str(out), data=data_root, checkpoint_every=1, batch_size=2, ema_decay=0.9, flux="random")
    cfg.phases = [Phase("fixed", 2, "fixed", 0.0, 3e-3), Phase("caption", 1, "caption", 0.5, 3e-3)]
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_root):
    """A run killed after step 2 of 3: checkpoints step_1 and step_2, log lines 1-2."""
    out = tmp_path_factory.mktemp("run") / "run"
    train(small_cfg(out, data_root), max_steps=2)
    return out


@pytest.fixture
def run_copy(run_dir, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def ckpt(out, step):
    return out / "checkpoints" / f"step_{step:08d}"


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ code execution

def test_crafted_state_file_is_refused_and_never_runs(run_copy, tmp_path, data_root):
    marker = tmp_path / "marker"
    for step in (1, 2):
        torch.save({"step": step, "optimizer": {}, "payload": WritesMarker(marker)}, ckpt(run_copy, step) / "state.pt")
    with pytest.raises(CheckpointError, match=r"step_00000002/state\.pt was refused"):
        load_checkpoint(ckpt(run_copy, 2))
    before = snapshot(run_copy)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint(.|\n)*step_00000001/state\.pt was refused"):
        train(small_cfg(run_copy, data_root), resume=True)
    assert not marker.exists(), "code from a checkpoint ran"
    assert snapshot(run_copy) == before, "a refused resume changes nothing in the run folder"


# ------------------------------------------------------------------------------------------ resume

@pytest.mark.parametrize("damage", ["missing_state", "corrupt_state", "corrupt_adapter"])
def test_resume_passes_over_a_damaged_checkpoint_and_a_dangling_latest(run_copy, data_root, damage):
    state = ckpt(run_copy, 2) / "state.pt"
    if damage == "missing_state":
        state.unlink()
    elif damage == "corrupt_state":
        state.write_bytes(state.read_bytes()[:100])
    else:
        (ckpt(run_copy, 2) / "adapter.safetensors").write_bytes(b"\x00" * 64)
    (run_copy / "checkpoints" / "latest").write_text("step_00000009")
    line1 = (run_copy / "log.jsonl").read_text().splitlines()[0]
    with pytest.warns(RuntimeWarning, match=r"continuing from step_00000001(.|\n)*latest names step_00000009(.|\n)*"
                                            r"step_00000002: .*(state\.pt is missing|state\.pt is corrupt|adapter\.safetensors is corrupt)"):
        result = train(small_cfg(run_copy, data_root), resume=True)
    assert result["step"] == 3
    log = (run_copy / "log.jsonl").read_text().splitlines()
    assert log[0] == line1, "step 1 is not run again (the resume started at step 1's checkpoint)"
    assert [r["step"] for r in read_log(run_copy / "log.jsonl")] == [1, 2, 3]
    assert (run_copy / "checkpoints" / "latest").read_text() == "step_00000003"
    load_checkpoint(ckpt(run_copy, 2))  # written again, valid
    assert list((run_copy / "checkpoints").glob("step_00000002.replaced-*")), "the damaged checkpoint is kept aside"


def test_resume_with_no_valid_checkpoint_stops_and_changes_nothing(run_copy, data_root):
    (run_copy / "checkpoints" / "latest").write_text("")
    for step in (1, 2):
        (ckpt(run_copy, step) / "adapter.safetensors").unlink()
    before = snapshot(run_copy)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint(.|\n)*step_00000002/adapter\.safetensors is missing"):
        train(small_cfg(run_copy, data_root), resume=True)
    assert snapshot(run_copy) == before, "log.jsonl and the checkpoints are untouched"


def test_resume_of_a_folder_without_a_run_starts_at_step_0(tmp_path, data_root):
    with pytest.warns(RuntimeWarning, match="holds no run yet"):
        assert train(small_cfg(tmp_path / "new", data_root), resume=True, max_steps=1)["step"] == 1


# ---------------------------------------------------------------------------------- run folder, lock

def test_a_folder_with_a_run_is_refused_without_resume_or_overwrite(run_copy, data_root, capsys):
    from idflux.cli import main

    before = snapshot(run_copy)
    with pytest.raises(RunFolderError, match=r"already holds a run .*--resume.*--overwrite"):
        train(small_cfg(run_copy, data_root))
    assert main(["train", "--data", data_root, "--out", str(run_copy), "--max-steps", "1"]) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert snapshot(run_copy) == before
    (run_copy / "data").mkdir()
    (run_copy / "data" / "keep.txt").write_text("user data")
    prepare_run_folder(run_copy, resume=False, overwrite=True)
    assert sorted(p.name for p in run_copy.iterdir()) == ["data"], "--overwrite removes the run's outputs only"


def test_lock_refuses_a_second_run_and_takes_over_a_stale_one(tmp_path, data_root):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from idflux.train.checkpoint import run_lock
        with run_lock({str(out)!r}):
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match=rf"in use by another run: pid {holder.pid}"):
            train(small_cfg(out, data_root), max_steps=1)
    finally:
        holder.kill()
        holder.wait()
    lock = out / "train.lock"
    assert json.loads(lock.read_text())["pid"] == holder.pid, "a killed run leaves its lock behind"
    with pytest.warns(RuntimeWarning, match=rf"stale lock of pid {holder.pid}"):
        with run_lock(out):
            info = json.loads(lock.read_text())
            assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
            with run_lock(out):  # re-entrant in one process (the CLI holds it around train())
                pass
            assert lock.exists()
    assert not lock.exists(), "released when the run ends"
    lock.write_text(json.dumps({"pid": 1, "host": "another-host", "started": "then"}))
    with pytest.raises(RunFolderError, match="pid 1 on host 'another-host'.*delete that file"):
        with run_lock(out):
            pass


# ----------------------------------------------------------------------------------------- full disk

def _weights():
    return {"w": torch.arange(6.0).view(2, 3)}


@pytest.mark.parametrize("how", ["write_fails", "no_room"])
def test_full_disk_is_reported_and_the_last_checkpoint_stays_intact(tmp_path, monkeypatch, how):
    import idflux.train.checkpoint as ck

    save_checkpoint(tmp_path, 1, weights=_weights(), state={"step": 1, "optimizer": {}}, config={})
    before = snapshot(tmp_path)
    if how == "write_fails":  # what torch.save raises when the disk fills up mid-write
        def full(*a, **k):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 3970")
        monkeypatch.setattr(ck.torch, "save", full)
        match = r"checkpoint step 2 could not be written .*a full disk\?.*previous checkpoint .*step_00000001 is intact"
    else:
        monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 9, 10 ** 9 - 10, 10))
        match = r"checkpoint step 2: not enough free disk space .*previous checkpoint .*step_00000001 is intact"
    with pytest.raises(CheckpointError, match=match):
        save_checkpoint(tmp_path, 2, weights=_weights(), state={"step": 2, "optimizer": {}}, config={})
    assert snapshot(tmp_path) == before and not list((tmp_path / "checkpoints").glob(".tmp*"))
    assert torch.equal(load_checkpoint(ckpt(tmp_path, 1))[0]["w"], _weights()["w"])


# ------------------------------------------------------------------------------------ adapter files

def test_checkpoint_and_final_adapter_files_are_idflux_adapters(run_dir, tmp_path, data_root):
    from idflux.engine.weights import load_adapter

    weights, state, ema = load_checkpoint(ckpt(run_dir, 2))
    a = load_adapter(ckpt(run_dir, 2) / "adapter.safetensors")
    e = load_adapter(ckpt(run_dir, 2) / "adapter_ema.safetensors")
    for k, v in a.state_dict().items():
        assert torch.equal(v, weights[k]) and torch.equal(e.state_dict()[k], ema[k]), k
    assert any(not torch.equal(v, ema[k]) for k, v in weights.items()), "EMA weights differ from the weights"
    final = load_adapter(run_dir / "adapter.safetensors")
    assert all(torch.equal(v, weights[k]) for k, v in final.state_dict().items()), "final adapter = last checkpoint's"
    final_ema = load_adapter(run_dir / "adapter_ema.safetensors")
    assert all(torch.equal(v, ema[k]) for k, v in final_ema.state_dict().items())
    assert not (run_dir / "train.lock").exists()


# ------------------------------------------------------------------------------------ synthetic data

def test_synthetic_data_only_where_asked(tmp_path):
    from idflux.train.data_pipeline import DataError, prepare_data

    typo = tmp_path / "datta"
    with pytest.raises(DataError, match=r"datta has no shards/.*--synthetic-data"):
        prepare_data(tiny(out=str(tmp_path / "run"), data=str(typo)))
    assert not typo.exists(), "a mistyped --data gets nothing written"
    real = tmp_path / "real"
    real.mkdir()
    (real / "000000.tar").write_bytes(b"a user's shard")
    for synthetic in (False, True):
        with pytest.raises(DataError, match="real"):
            prepare_data(tiny(out=str(tmp_path / "run"), data=str(real), synthetic_data=synthetic))
    assert sorted(p.name for p in real.iterdir()) == ["000000.tar"], "never written into a folder with data"
    with pytest.raises(DataError, match="needs --data"):
        prepare_data(C.flux_dev(out=str(tmp_path / "run")))


def _build_data_worker(rank, world, port, out, log):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import idflux.train.synthetic as synthetic
    from idflux.train import distributed
    from idflux.train.data_pipeline import build_dataset

    real = synthetic.write_multiid

    def recorded(root, *a, **k):
        with open(log, "a") as f:
            f.write(f"{rank}\n")
        time.sleep(0.5)  # a slow writer: another rank must not read before it is done
        return real(root, *a, **k)

    synthetic.write_multiid = recorded
    distributed.setup("cpu")
    cfg = tiny(out=out)
    cfg.size = 64
    ds = build_dataset(cfg)
    assert len(ds) == 96, len(ds)
    distributed.cleanup()


def test_torchrun_tiny_builds_synthetic_data_once_on_rank_0(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "generated_by"
    mp.spawn(_build_data_worker, args=(2, port, str(tmp_path / "run"), str(log)), nprocs=2, join=True)
    assert log.read_text().split() == ["0"], "only rank 0 generates; rank 1 reads what it wrote"
    assert not list(tmp_path.glob("run/.data.tmp*"))


# ------------------------------------------------------------------------------------------ options

def _parse(*argv):
    from idflux.cli import build_parser
    from idflux.train.cli import config_from_args

    return config_from_args(build_parser().parse_args(["train", *argv]))


@pytest.mark.parametrize("argv, match", [
    (["--grad-accum", "-1"], r"grad_accum \(--grad-accum\) must be an int >= 1"),
    (["--grad-accum", "0"], r"--grad-accum"),
    (["--ema", "2.0"], r"ema_decay \(--ema\) must be a finite number in \[0.0, 1.0\)"),
    (["--ema", "nan"], r"--ema"),
    (["--batch-size", "0"], r"batch_size \(--batch-size\)"),
    (["--batch-size", "6", "--grad-accum", "4"], r"divisible"),
    (["--max-steps", "0"], r"max_steps \(--max-steps\)"),
    (["--seed", "-1"], r"seed \(--seed\)"),
    (["--lr", "-0.1"], r"phases\[0\]\.lr"),
    (["--lr", "inf"], r"phases\[0\]\.lr"),
    (["--size", "30"], r"size \(--size\) must be a multiple of 16"),
    (["--checkpoint-every", "0"], r"--checkpoint-every"),
    (["--workers", "-2"], r"--workers"),
    (["--device", "tpu"], r"--device"),
    (["--adapter-init", "/nonexistent/a.safetensors"], r"adapter_init \(--adapter-init\) /nonexistent/a\.safetensors is not a file"),
    (["--set", "tau=0"], r"tau must be"),
    (["--set", "bogus=1"], r"unknown key\(s\) \['bogus'\]"),
])
def test_every_numeric_option_is_validated_at_parse_time(argv, match, tmp_path, capsys):
    from idflux.cli import main

    with pytest.raises(C.ConfigError, match=match):
        _parse(*argv)
    assert main(["train", "--out", str(tmp_path / "run"), *argv]) == 2
    assert "idflux train: error:" in capsys.readouterr().err
    assert not (tmp_path / "run").exists(), "nothing is created before the options are valid"


def test_adapter_init_is_used_by_the_tiny_preset(tmp_path):
    from idflux.engine.weights import save_adapter
    from idflux.train.model import TrainModel

    cfg = tiny(out=str(tmp_path), flux="random")
    src = TrainModel.build(cfg).adapter
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    save_adapter(src, tmp_path / "init.safetensors")
    got = TrainModel.build(tiny(out=str(tmp_path), flux="random", adapter_init=str(tmp_path / "init.safetensors"))).adapter
    for k, v in src.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), f"--adapter-init ignored: {k}"


# ------------------------------------------------------------------------------------- config file

def test_config_file_with_overrides_gives_the_expected_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent("""
        preset: tiny
        num_negatives: 32
        id_weight: 0.25
        checkpoint_every: 7
        phases:
          - {name: rec, steps: 5, prompt_mode: fixed, lr: 1e-3}
          - {name: quality, steps: 2, paired_ratio: 0.5, lr: 1.0e-4}
        """))
    cfg = _parse("--config", str(path), "--seed", "5", "--set", "cl_weight=0.3", "--lr", "2e-3", "--out", "o")
    want = tiny(out="o", num_negatives=32, id_weight=0.25, checkpoint_every=7, seed=5, cl_weight=0.3,
                phases=[Phase("rec", 5, "fixed", 0.0, 2e-3), Phase("quality", 2, "caption", 0.5, 2e-3)])
    assert cfg == want
    assert _parse("--config", str(path)).phases[0].lr == 1e-3, "1e-3 (YAML reads it as text) is a number"
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"preset": "flux-dev", "batch_size": 8, "tau": 0.05}))
    cfg = _parse("--config", str(js), "--batch-size", "16")
    assert (cfg.preset, cfg.out, cfg.batch_size, cfg.tau, cfg.num_workers) == ("flux-dev", "runs/flux-dev", 16, 0.05, 4)


@pytest.mark.parametrize("text, match", [
    ("num_negativs: 3\n", r"unknown key\(s\) \['num_negativs'\]"),
    ("phases:\n  - {name: a, steps: 2, lr_: 1.0}\n", r"unknown key\(s\) \['lr_'\] in phases\[0\]"),
    ("phases:\n  - {name: a, steps: 0}\n", r"phases\[0\]\.steps \('a'\) must be an int >= 1"),
    ("batch_size: four\n", r"batch_size \(--batch-size\) must be an int >= 1, got 'four'"),
    ("ema_decay: 1.5\n", r"ema_decay \(--ema\)"),
    ("- a list\n", r"top level must be a mapping"),
    ("a: [unclosed\n", r"not valid YAML"),
])
def test_config_file_errors_name_the_key(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(C.ConfigError, match=match):
        _parse("--config", str(path))


def test_print_config_round_trips(tmp_path, capsys):
    from idflux.cli import main

    assert main(["train", "--preset", "tiny", "--ema", "0.99", "--set", "num_negatives=16", "--out", str(tmp_path / "o"),
                 "--print-config"]) == 0
    (tmp_path / "printed.yaml").write_text(capsys.readouterr().out)
    assert not (tmp_path / "o").exists()
    assert _parse("--config", str(tmp_path / "printed.yaml")) == _parse("--ema", "0.99", "--set", "num_negatives=16",
                                                                       "--out", str(tmp_path / "o"))
