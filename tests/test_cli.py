"""Every ``idflux`` subcommand runs: --help, and a real invocation."""

import argparse
import json
import os
import subprocess
import sys

import pytest

from idflux.cli import main


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["env", "--help"], ["eval", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage: idflux" in capsys.readouterr().out


def test_env_json(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] and set(info["backends"]) == {"region_attention", "cosine_infonce", "face_warp"}
    assert info["TRITON_INTERPRET"] == os.environ["TRITON_INTERPRET"]  # as conftest set it


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "idflux", "env"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "region_attention" in out.stdout


def test_bench_writes_json_and_plot(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "region_attention", "--quick", "--budget", "0", "--out", str(out), "--plot", str(tmp_path / "plots"), "--strict"]) == 0
    doc = json.loads(out.read_text())
    providers = {r["provider"] for r in doc["rows"]}
    assert {"ref", "sdpa_mask", "sdpa_mask+build", "gather_sdpa", "copy"} <= providers
    for row in doc["rows"]:
        assert row["ms"] > 0 and row["device"] == "cpu" and row["torch"] and row["commit"]
        assert row["ms_p20"] <= row["ms"] <= row["ms_p80"]
    assert any(s["provider"] == "ref" and s["baseline"] == "sdpa_mask" for s in doc["speedups"])
    assert (tmp_path / "plots" / "region_attention.png").stat().st_size > 1000


def test_bench_cuda_without_cuda_is_a_clear_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_bench_rejects_unknown_op(capsys):
    assert main(["bench", "not_an_op"]) == 2
    assert "unknown op" in capsys.readouterr().err


def test_bench_profile_writes_trace(tmp_path):
    assert main(["bench", "region_attention", "--quick", "--budget", "0", "--profile", str(tmp_path), "--profile-cases", "2"]) == 0
    trace = json.loads((tmp_path / "region_attention_trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert any(n and n.startswith("idflux.region_attention[") for n in names)  # one named range per case


def test_generate_cuda_graph_off_cuda_is_a_clear_error(capsys):
    pytest.importorskip("diffusers")
    argv = ["generate", "--preset", "tiny", "--prompt", "a", "--ref", "a.jpg", "--box", "0,0,16,16", "--out", "x.png",
            "--device", "cpu", "--cuda-graph"]
    assert main(argv) == 2
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err


def test_version(capsys):
    from idflux import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"idflux {__version__}"


def test_env_prints_idflux_and_library_versions(capsys):
    from idflux import __version__

    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["idflux"] == __version__
    for name in ("diffusers", "transformers", "insightface", "gradio"):
        assert info[name], name  # a version or "not installed"


def _subparser(name):
    from idflux.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


@pytest.mark.parametrize("command", ["generate", "export"])
def test_every_option_has_help_and_shows_its_default(command):
    p = _subparser(command)
    assert issubclass(p.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    for action in p._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
    assert "(default:" in p.format_help()


def test_parse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--steps", "zero"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "--steps" in err and "--help" in err


def test_export_errors_before_writing(tmp_path, capsys):
    assert main(["export", str(tmp_path / "no_run"), "--out", str(tmp_path / "a.safetensors")]) == 2
    assert "neither a checkpoint folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not (tmp_path / "a.safetensors").exists()
