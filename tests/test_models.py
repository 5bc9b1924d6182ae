"""Models through load_model: the built-in ones on real photos, user ONNX of the three types."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from inference.models import load_model, parse
from inference.models.parse import CutsAfterParsing, select
from inference.settings import Settings
from inference.types import Model, ModelError, ModelInfo
from tests import onnx_graphs

CATS = {"tiger cat", "Egyptian cat", "tabby, tabby cat", "Persian cat", "Siamese cat, Siamese"}


def run(model, frame):  # type: ignore[no-untyped-def]
    return model.parse(model.infer(model.preprocess(frame)))


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def test_efficientnet_classifies_chelsea_as_a_cat(chelsea_bgr: np.ndarray) -> None:
    model = load_model(Settings(model="efficientnet-lite0"))
    parsed = run(model, chelsea_bgr)
    entries = parsed["classification"]
    # The device form: every class, sorted by prob, int labels and float probs.
    assert len(entries) == 1000
    assert [e["prob"] for e in entries] == sorted((e["prob"] for e in entries), reverse=True)
    assert all(isinstance(e["label"], int) and isinstance(e["prob"], float) for e in entries)
    items = select(parsed, model.info, top_k=3, threshold=0.0, frame_size=(451, 300))
    assert len(items) == 3
    assert {i.name for i in items} & CATS
    assert items[0].name in ("tiger cat", "Egyptian cat")


def test_the_loops_parse_is_the_head_of_the_full_one(chelsea_bgr: np.ndarray) -> None:
    # The loop keeps only the first top_k entries and builds only those: they must be the very
    # entries, in the very order, of the device form's list.
    model = load_model(Settings(model="efficientnet-lite0"))
    assert isinstance(model, Model)  # the protocol the loop runs: parse_top included
    raw = model.infer(model.preprocess(chelsea_bgr))
    full = model.parse(raw)["classification"]
    for k in (1, 5, 999, 1000, 5000):
        assert model.parse_top(raw, k) == {"classification": full[:k]}


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 7])
def test_a_partial_classification_parse_breaks_ties_as_the_full_sort(k: int) -> None:
    # Ties straddle the cut: a stable sort puts the lower label first, and so must the head.
    probs = np.array([0.1, 0.3, 0.1, 0.3, 0.0, 0.1, 0.3, -0.0], np.float32)
    full = parse.classification(probs)["classification"]
    assert parse.classification(probs, k)["classification"] == full[:k]
    rng = np.random.default_rng(k)
    many = rng.integers(0, 4, 1000).astype(np.float32)  # mostly ties
    assert parse.classification(many, k * 7) == {
        "classification": parse.classification(many)["classification"][: k * 7]}


def test_a_model_that_parses_everything_is_cut_after_its_own_parse() -> None:
    class DeviceLike(CutsAfterParsing):
        def parse(self, raw):  # type: ignore[no-untyped-def]
            return {"classification": [{"label": i, "prob": 1.0 / (i + 1)} for i in range(10)]}

    parsed = DeviceLike().parse_top({}, 3)
    assert parsed == {"classification": [{"label": i, "prob": 1.0 / (i + 1)} for i in range(3)]}


def test_detections_are_never_cut_before_the_threshold() -> None:
    # A device's parseResult may list boxes in any order: cutting at top-k first would drop the
    # confident ones that come late.
    boxes = [{"label": i, "prob": p, "xmin": 0.0, "ymin": 0.0, "xmax": 10.0, "ymax": 10.0}
             for i, p in enumerate([0.1, 0.2, 0.9, 0.1, 0.8])]

    class DeviceLike(CutsAfterParsing):
        def parse(self, raw):  # type: ignore[no-untyped-def]
            return {"ssd": list(boxes)}

    parsed = DeviceLike().parse_top({}, 2)
    assert parsed == {"ssd": boxes}
    info = ModelInfo("device", "ssd", 300, 300, "awscam", {})
    items = select(parsed, info, top_k=2, threshold=0.5, frame_size=(300, 300))
    assert [item.label for item in items] == [2, 4]


def _skimage_bgr(name: str) -> np.ndarray:
    import skimage.data

    return cv2.cvtColor(getattr(skimage.data, name)(), cv2.COLOR_RGB2BGR)


def test_catdog_is_the_seed_classifier_with_neither(chelsea_bgr: np.ndarray) -> None:
    model = load_model(Settings(model="catdog"))
    parsed = run(model, chelsea_bgr)
    entries = parsed["classification"]
    # The seed's ids stay: 0 dog, 1 cat; "neither" is the rest of the 1000-class softmax.
    assert model.info.labels == {0: "dog", 1: "cat", 2: "neither"}
    assert [e["label"] for e in entries] == [1, 2, 0]
    assert entries[0]["prob"] > 0.9
    assert abs(sum(e["prob"] for e in entries) - 1.0) < 1e-5


@pytest.mark.parametrize("photo", ["coffee", "rocket", "astronaut"])
def test_catdog_says_neither_for_no_animal_and_a_threshold_filters_dog_and_cat(photo: str) -> None:
    # It once said "dog" at 93-99 % on these: dog and cat were renormalised to sum to 1.
    model = load_model(Settings(model="catdog"))
    parsed = run(model, _skimage_bgr(photo))
    probs = {e["label"]: e["prob"] for e in parsed["classification"]}
    assert parsed["classification"][0]["label"] == 2
    assert probs[0] < 0.1 and probs[1] < 0.1 and probs[2] > 0.9
    items = select(parsed, model.info, top_k=3, threshold=0.5, frame_size=(512, 512))
    assert [item.name for item in items] == ["neither"]


def test_catdog_keeps_the_real_summed_probabilities() -> None:
    model = load_model(Settings(model="catdog"))
    probs = np.zeros((1, 1000), np.float32)
    probs[0, 207] = 0.6  # golden retriever
    probs[0, 151] = 0.05  # Chihuahua, the first dog breed
    probs[0, 281] = 0.1  # tabby
    probs[0, 500] = 0.25
    parsed = model.parse({"probs": probs})
    got = {e["label"]: e["prob"] for e in parsed["classification"]}
    assert parsed["classification"][0]["label"] == 0
    assert got == {0: pytest.approx(0.65), 1: pytest.approx(0.1), 2: pytest.approx(0.25)}


def test_centerface_finds_the_astronaut_face(astronaut_bgr: np.ndarray) -> None:
    model = load_model(Settings(model="centerface"))
    parsed = run(model, astronaut_bgr)
    assert model.info.type == "ssd"
    items = select(parsed, model.info, top_k=10, threshold=0.5, frame_size=(512, 512))
    assert len(items) == 1 and items[0].name == "face"
    assert items[0].box is not None
    # Face region checked by eye on the 512x512 photo: cheek to cheek, hairline to chin.
    assert iou(items[0].box, (180, 75, 265, 185)) > 0.5
    # Raw parse is in model-input pixels.
    raw = parsed["ssd"][0]
    assert 0 <= raw["xmin"] < raw["xmax"] <= model.info.input_width
    assert 0 <= raw["ymin"] < raw["ymax"] <= model.info.input_height


def test_user_onnx_classifier_with_labels(tmp_path: Path) -> None:
    path = tmp_path / "colour.onnx"
    path.write_bytes(onnx_graphs.classifier(softmax=False))
    labels = tmp_path / "labels.txt"
    labels.write_text("red\ngreen\nblue\nother\n")
    model = load_model(Settings(model=str(path), model_type="classification", labels=str(labels)))
    frame = np.zeros((64, 64, 3), np.uint8)
    frame[:, :, 2] = 255  # red in BGR
    parsed = run(model, frame)
    assert parsed["classification"][0]["label"] == 0
    # Logits were turned into probabilities.
    assert sum(e["prob"] for e in parsed["classification"]) == pytest.approx(1.0, abs=1e-4)
    assert model.info.input_width == 32 and model.info.labels[0] == "red"


def test_user_onnx_segmentation_gives_a_class_map(tmp_path: Path) -> None:
    path = tmp_path / "seg.onnx"
    path.write_bytes(onnx_graphs.segmenter())
    model = load_model(Settings(model=str(path), model_type="segmentation"))
    frame = np.zeros((64, 64, 3), np.uint8)
    frame[:, :32] = (0, 0, 255)  # left half red
    frame[:, 32:] = (0, 255, 0)  # right half green
    parsed = run(model, frame)
    class_map = parsed["segmentation"]
    assert class_map.shape == (16, 16) and class_map.dtype == np.int32
    assert (class_map[:, :8] == 1).all() and (class_map[:, 8:] == 2).all()
    items = select(parsed, model.info, top_k=5, threshold=0.0, frame_size=(64, 64))
    assert {i.label for i in items} == {1, 2}
    assert sum(i.prob for i in items) == pytest.approx(1.0)


def test_user_onnx_ssd_detection_output(tmp_path: Path) -> None:
    path = tmp_path / "det.onnx"
    rows = [[0, 15, 0.9, 0.1, 0.2, 0.5, 0.6], [0, 7, 0.3, 0.5, 0.5, 0.9, 0.9], [0, 3, 0.0, 0, 0, 1, 1]]
    path.write_bytes(onnx_graphs.detector(rows))
    model = load_model(Settings(model=str(path), model_type="ssd", labels="voc"))
    parsed = run(model, np.zeros((100, 200, 3), np.uint8))
    det = parsed["ssd"]
    assert len(det) == 2  # zero-confidence rows are padding
    assert det[0] == {"label": 15, "prob": pytest.approx(0.9), "xmin": pytest.approx(30.0),
                      "ymin": pytest.approx(60.0), "xmax": pytest.approx(150.0),
                      "ymax": pytest.approx(180.0)}
    items = select(parsed, model.info, top_k=5, threshold=0.25, frame_size=(200, 100))
    assert [i.name for i in items] == ["person", "car"]
    assert items[0].box == pytest.approx((20.0, 20.0, 100.0, 60.0))
    assert items[0].box_norm == pytest.approx((0.1, 0.2, 0.5, 0.6))


def test_threshold_is_strictly_greater(tmp_path: Path) -> None:
    path = tmp_path / "det.onnx"
    path.write_bytes(onnx_graphs.detector([[0, 1, 0.5, 0.1, 0.1, 0.2, 0.2]]))
    model = load_model(Settings(model=str(path), model_type="ssd"))
    parsed = run(model, np.zeros((300, 300, 3), np.uint8))
    assert select(parsed, model.info, 5, 0.5, (300, 300)) == ()
    assert len(select(parsed, model.info, 5, 0.49, (300, 300))) == 1


@pytest.mark.parametrize(
    ("settings", "option", "needle"),
    [
        (Settings(model="/nonexistent/model.onnx"), "--model", "/nonexistent/model.onnx"),
        (Settings(model="efficientnet-lite0", labels="/nope/labels.txt"), "--labels", "/nope/labels.txt"),
        (Settings(model="centerface", input_size=(100, 100)), "--input-size", "100"),
    ],
)
def test_bad_model_files_are_refused_naming_the_path(settings: Settings, option: str, needle: str) -> None:
    with pytest.raises(ModelError) as err:
        load_model(settings)
    assert err.value.option == option
    assert needle in str(err.value)


def test_truncated_or_non_onnx_file_is_refused(tmp_path: Path) -> None:
    good = onnx_graphs.classifier()
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(good[: len(good) // 2])
    text = tmp_path / "text.onnx"
    text.write_text("not a model")
    for path in (truncated, text):
        with pytest.raises(ModelError, match=str(path)):
            load_model(Settings(model=str(path), model_type="classification"))


def test_preprocess_centre_crop_keeps_the_middle() -> None:
    from inference.models.preprocess import Preprocess

    pre = Preprocess(4, 4, color="bgr", scale=1.0, center_crop=0.5, layout="hwc", dtype="uint8")
    frame = np.zeros((100, 200, 3), np.uint8)
    frame[25:75, 75:125] = 200  # the centre square of half the short side
    out = pre(frame)
    assert out.shape == (4, 4, 3) and (out == 200).all()
    assert pre.crop_box(200, 100) == (75, 25, 125, 75)
    resized = cv2.resize(frame, (4, 4))
    assert not (resized == 200).all()


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "hwc"])
@pytest.mark.parametrize("color", ["rgb", "bgr"])
@pytest.mark.parametrize("center_crop", [0.0, 0.875])
def test_preprocess_in_one_call_matches_the_step_by_step_reference(
    layout: str, color: str, center_crop: float
) -> None:
    from inference.models.preprocess import Preprocess

    pre = Preprocess(96, 64, color=color, scale=1 / 255, mean=(0.485, 0.456, 0.406),  # type: ignore[arg-type]
                     std=(0.229, 0.224, 0.225), center_crop=center_crop, layout=layout)  # type: ignore[arg-type]
    assert pre._params is not None  # the one-call path is what runs here
    frame = np.random.default_rng(3).integers(0, 256, (272, 640, 3), dtype=np.uint8)
    x0, y0, x1, y1 = pre.crop_box(640, 272)
    expected = pre.reference(frame[y0:y1, x0:x1])
    out = pre(frame)
    assert out.shape == expected.shape and out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert Preprocess(8, 8, dtype="uint8")._params is None  # uint8 input stays as it is
