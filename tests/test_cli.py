"""The console script: headless infer, --help, env vars, and exit code 2 naming the option."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.cli import build_parser
from inference.settings import ENV_PREFIX, Settings
from tests.conftest import ROOT


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPLENS_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def test_infer_prints_one_json_line_per_frame(image_file: Path) -> None:
    proc = cli("infer", "--source", str(image_file), "--frames", "3", "--top-k", "2")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 3
    for line in lines:
        payload, result = line["payload"], line["result"]
        assert len(payload) == 2 and all(isinstance(v, float) for v in payload.values())
        assert list(payload) == [r["name"] for r in result["results"]]
        assert result["model"]["name"] == "efficientnet-lite0"
        # headless: nobody looks at the frame, so no overlay is drawn
        assert set(result["timings_ms"]) == {"capture", "preprocess", "inference", "postprocess"}
    assert [line["result"]["seq"] for line in lines] == [1, 2, 3]
    assert next(iter(lines[0]["payload"])) in ("tiger cat", "Egyptian cat")


def test_infer_catdog_gives_the_seed_payload(image_file: Path) -> None:
    proc = cli("infer", "--source", str(image_file), "--frames", "1", "--model", "catdog")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)["payload"]
    assert list(payload) == ["cat", "neither", "dog"] and payload["cat"] > 0.9


@pytest.mark.parametrize("spec", ["synthetic@30", "synthetic:320x240@30", "synthetic:320x240",
                                  "synthetic"])
def test_infer_takes_every_documented_synthetic_spec(spec: str) -> None:
    proc = cli("infer", "--source", spec, "--frames", "1", "--top-k", "1")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)["result"]
    assert result["error"] is None
    assert result["frame_size"] == ([320, 240] if ":" in spec else [1280, 720])


@pytest.mark.parametrize("spec", ["synthetic@", "synthetic:320", "synthetic:8x8", "synthetic@x"])
def test_infer_refuses_a_bad_synthetic_spec_naming_source(spec: str) -> None:
    proc = cli("infer", "--source", spec, "--frames", "1")
    assert proc.returncode == 2, proc.stderr
    assert "--source" in proc.stderr and spec in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_env_vars_set_options(image_file: Path) -> None:
    proc = cli("infer", "--frames", "1",
               env={"DEEPLENS_SOURCE": str(image_file), "DEEPLENS_TOP_K": "1"})
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["payload"]) == 1


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--top-k", "0"], {}, "--top-k"),
        (["--threshold", "2"], {}, "--threshold"),
        (["--threshold", "abc"], {}, "--threshold"),
        (["--display-res", "999p"], {}, "--display-res"),
        (["--input-size", "224"], {}, "--input-size"),
        (["--overlay", "maybe"], {}, "--overlay"),
        (["--loop-cpu", "fast"], {}, "--loop-cpu"),
        (["--loop-cpu", "4096"], {}, "not available to this process"),
        ([], {"DEEPLENS_TOP_K": "zero"}, "DEEPLENS_TOP_K"),
        (["--source", "/no/such/clip.mp4"], {}, "--source"),
        (["--model", "/no/such/model.onnx"], {}, "/no/such/model.onnx"),
        (["--labels", "/no/such/labels.txt"], {}, "/no/such/labels.txt"),
        (["--no-such-option"], {}, "--no-such-option"),
    ],
)
def test_bad_values_exit_2_naming_the_option(args: list[str], env: dict[str, str], needle: str) -> None:
    proc = cli("infer", "--frames", "1", *args, env=env)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_help_documents_every_option_with_its_env_var() -> None:
    parser = build_parser()
    serve_help = parser._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    assert len(Settings.model_fields) > 40
    for name in Settings.model_fields:
        flag, env = "--" + name.replace("_", "-"), ENV_PREFIX + name.upper()
        assert flag in serve_help, flag
        assert env in serve_help, env
    # a field with a default_factory once showed its placeholder as the default
    assert "MISSING" not in serve_help


def test_settings_from_env_and_defaults() -> None:
    s = Settings.load(env={"DEEPLENS_THRESHOLD": "0.25", "DEEPLENS_OVERLAY": "off",
                           "DEEPLENS_INPUT_SIZE": "300x300", "DEEPLENS_MEAN": "0.5"})
    assert s.threshold == 0.25 and s.overlay is False
    assert s.input_size == (300, 300) and s.mean == (0.5, 0.5, 0.5)
    assert Settings().port == 8080 and Settings().fifo == "/tmp/results.mjpeg"


def test_config_file_sets_options_below_env_and_flags(tmp_path: Path, image_file: Path) -> None:
    config = tmp_path / "dashboard.toml"
    config.write_text(f'source = "{image_file}"\ntop-k = 4\nthreshold = 0.0\n')
    proc = cli("infer", "--frames", "1", "--config", str(config), env={"DEEPLENS_TOP_K": "3"})
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["payload"]) == 3
    proc = cli("infer", "--frames", "1", "--config", str(config), "--top-k", "2")
    assert len(json.loads(proc.stdout)["payload"]) == 2


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ('source = "demo"\n\ntop_k = 0\n', ["line 3", "top_k", "greater than or equal to 1"]),
        ('source = "demo"\ncolour = "rgb"\n', ["line 2", "unknown key 'colour'"]),
        ("top_k = \n", ["dashboard.toml"]),
    ],
)
def test_config_file_errors_name_the_key_and_line(tmp_path: Path, text: str, needles: list[str]) -> None:
    config = tmp_path / "dashboard.toml"
    config.write_text(text)
    proc = cli("infer", "--frames", "1", "--config", str(config))
    assert proc.returncode == 2
    for needle in needles:
        assert needle in proc.stderr


def test_corrupt_video_and_unreadable_images_are_refused_at_start(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(bytes(range(256)) * 40)
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"not a jpeg")
    for source in (corrupt, folder):
        proc = cli("infer", "--frames", "1", "--source", str(source))
        assert proc.returncode == 2, proc.stderr
        assert "--source" in proc.stderr and str(source) in proc.stderr


def test_labels_file_with_the_wrong_count_is_logged(tmp_path: Path, image_file: Path) -> None:
    from tests import onnx_graphs

    model = tmp_path / "colour.onnx"
    model.write_bytes(onnx_graphs.classifier(num_classes=4))
    labels = tmp_path / "labels.txt"
    labels.write_text("red\ngreen\n")  # two names for four classes
    proc = cli("infer", "--frames", "1", "--source", str(image_file), "--model", str(model),
               "--model-type", "classification", "--labels", str(labels))
    assert proc.returncode == 0, proc.stderr
    assert "2 names for 4 classes" in proc.stderr
    names = [r["name"] for r in json.loads(proc.stdout)["result"]["results"]]
    assert set(names) == {"red", "green", "2", "3"}  # unnamed ids show as numbers


def test_detectors_default_to_the_samples_threshold(tmp_path: Path) -> None:
    import cv2
    import skimage.data

    photo = tmp_path / "astronaut.png"
    cv2.imwrite(str(photo), cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))
    proc = cli("infer", "--frames", "1", "--source", str(photo), "--model", "centerface")
    result = json.loads(proc.stdout)["result"]
    assert result["threshold"] == 0.25
    assert [r["name"] for r in result["results"]] == ["face"]  # weak candidates filtered
    proc = cli("infer", "--frames", "1", "--source", str(photo), "--model", "centerface",
               "--threshold", "0")
    assert json.loads(proc.stdout)["result"]["threshold"] == 0.0


def test_top_level_help_shows_the_default_commands_options_with_their_ranges() -> None:
    proc = cli("--help")
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())  # argparse wraps to the terminal width
    assert out.startswith("usage: deeplens-dashboard [serve] [OPTIONS]")
    for flag in ("--source SOURCE", "--top-k K", "--port PORT", "--iot {auto,greengrass,mqtt,log,off}"):
        assert flag in out, flag
    assert "K: 1 to 1000" in out and "P: 0 to 1" in out and "PORT: 1 to 65535" in out
    assert "SECONDS: more than 0, at most 86400" in out
    for command in ("infer", "package-lambda", "package-device"):
        assert command in out, command


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--prot", "18090"], "unrecognized arguments: --prot 18090"),  # no abbreviation of --protect-views
        (["--top-k", "x"], "--top-k"),
        (["infer", "--bogus"], "deeplens-dashboard infer: error: unrecognized arguments: --bogus"),
        (["package-lambda"], "-o/--output"),
    ],
)
def test_a_usage_error_is_one_line_and_where_the_options_are(args: list[str], needle: str) -> None:
    proc = cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and needle in lines[0], proc.stderr
    assert lines[1].startswith("(the options: deeplens-dashboard") and lines[1].endswith("--help)")


def _nan_classifier() -> bytes:
    """An ONNX classifier that loads and runs, and gives NaN for every frame: log of a negative."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Sub", ["flat", "ten"], ["negative"]),
        helper.make_node("Log", ["negative"], ["probs"]),
    ]
    graph = helper.make_graph(
        nodes, "nan", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 3])],
        initializer=[numpy_helper.from_array(np.full((1, 3), 10.0, np.float32), "ten")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def _photos(folder: Path) -> Path:
    import cv2
    import skimage.data

    folder.mkdir()
    for name in ("astronaut", "chelsea", "coffee"):
        rgb = getattr(skimage.data, name)()
        cv2.imwrite(str(folder / f"{name}.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return folder


def _lines(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_infer_walks_a_folder_once_file_by_file_naming_each(tmp_path: Path) -> None:
    # It once printed the first image 7 times: the slideshow's 3 s interval paced infer.
    folder = _photos(tmp_path / "photos")
    proc = cli("infer", "--source", str(folder), "--frames", "7", "--slide-interval", "600")
    assert proc.returncode == 0, proc.stderr
    lines = _lines(proc)
    assert [line["result"]["source"] for line in lines] == [
        {"name": f"{name}.jpg", "path": str(folder / f"{name}.jpg")}
        for name in ("astronaut", "chelsea", "coffee")]
    assert next(iter(lines[1]["payload"])) in ("tiger cat", "Egyptian cat")
    assert next(iter(lines[2]["payload"])) == "espresso"
    # --frames stays an upper bound; a glob is walked the same way.
    proc = cli("infer", "--source", str(folder / "c*.jpg"), "--frames", "1")
    assert proc.returncode == 0, proc.stderr
    assert [line["result"]["source"]["name"] for line in _lines(proc)] == ["chelsea.jpg"]


def test_infer_names_a_video_file_and_its_frame_but_not_a_generated_one() -> None:
    proc = cli("infer", "--source", "demo", "--frames", "2", "--top-k", "1")
    assert proc.returncode == 0, proc.stderr
    sources = [line["result"]["source"] for line in _lines(proc)]
    assert [s["name"] for s in sources] == ["bikes.mp4", "bikes.mp4"]
    assert sources[0]["frame"] < sources[1]["frame"]
    proc = cli("infer", "--source", "synthetic:64x48@0", "--frames", "1", "--top-k", "1")
    assert proc.returncode == 0, proc.stderr
    assert _lines(proc)[0]["result"]["source"] is None


def test_infer_exits_1_when_no_camera_gave_a_frame() -> None:
    if Path("/dev/video0").exists():
        pytest.skip("this machine has a camera")
    proc = cli("infer", "--source", "0", "--frames", "2")
    assert proc.returncode == 1, proc.stderr
    lines = _lines(proc)  # the error results are still printed
    assert len(lines) == 2 and all(line["result"]["error"].startswith("no signal") for line in lines)
    assert "no frame could be inferred" in proc.stderr and "no signal" in proc.stderr


def test_infer_exits_1_when_the_model_fails_on_every_frame(tmp_path: Path, image_file: Path) -> None:
    model = tmp_path / "nan.onnx"
    model.write_bytes(_nan_classifier())
    proc = cli("infer", "--source", str(image_file), "--frames", "2", "--model", str(model),
               "--model-type", "classification")
    assert proc.returncode == 1, proc.stderr
    lines = _lines(proc)
    assert len(lines) == 2 and all("NaN" in line["result"]["error"] for line in lines)
    assert "no frame could be inferred" in proc.stderr and "model error" in proc.stderr


def test_infer_saves_each_annotated_frame_named_after_its_file(tmp_path: Path) -> None:
    import cv2

    folder = _photos(tmp_path / "photos")
    out = tmp_path / "out" / "annotated"  # created, parents too
    proc = cli("infer", "--source", str(folder), "--save", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg"]
    for line in _lines(proc):
        saved = Path(line["saved"])
        assert saved.parent == out and saved.stem == Path(line["result"]["source"]["name"]).stem
    original = cv2.imread(str(folder / "chelsea.jpg"))
    annotated = cv2.imread(str(out / "chelsea.jpg"))
    assert annotated.shape == original.shape  # 451x300: shown at its own size
    # The overlay (top label, top-left; the fps line, bottom-left) is drawn, the rest untouched.
    diff = np.abs(annotated.astype(int) - original.astype(int)).max(axis=2) > 60
    assert diff[:40].any() and diff[-20:].any() and not diff[150:270].any()
    # No file to name: the frame number.
    proc = cli("infer", "--source", "synthetic:64x48@0", "--frames", "2", "--save", str(tmp_path / "syn"))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "syn").iterdir()) == ["frame-000001.jpg", "frame-000002.jpg"]


def test_infer_refuses_a_save_folder_it_cannot_make(tmp_path: Path, image_file: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for bad in (blocker, blocker / "sub"):
        proc = cli("infer", "--source", str(image_file), "--frames", "1", "--save", str(bad))
        assert proc.returncode == 2, proc.stderr
        assert "--save" in proc.stderr and str(bad) in proc.stderr and "Traceback" not in proc.stderr
        assert "unrecognized" not in proc.stderr
        assert proc.stdout == ""
