"""CenterFace on the bundled weights: real images, no network."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Callable, Dict, List, Union

import cv2
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
from skimage import data

from inference.models.centerface import (
    HEATMAP,
    INPUT_NAME,
    LANDMARKS,
    MAX_DETECTIONS,
    MODEL_PATH,
    OFFSET,
    OUTPUT_NAMES,
    SCALE,
    decode_centerface,
    load_centerface_onnx,
    preprocess_centerface,
)
from inference.settings import SSD_DEFAULT_THRESHOLD

# The face in skimage's 512x512 astronaut, read off a 4x zoom with a 10 px grid: cheek to cheek
# (ears excluded) and from the hairline on the forehead to the chin.
ASTRONAUT_FACE = (180.0, 75.0, 265.0, 185.0)

SIZES = [(320, 320), (512, 512), (640, 480)]

Detections = List[Dict[str, Union[float, int]]]
Detector = Callable[[npt.NDArray[np.uint8], int, int], Detections]


def _bgr(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    return np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), dtype=np.uint8)


def _astronaut() -> npt.NDArray[np.uint8]:
    return _bgr(data.astronaut())  # type: ignore[no-untyped-call]


def _coffee() -> npt.NDArray[np.uint8]:
    return _bgr(data.coffee())  # type: ignore[no-untyped-call]


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _session(width: int, height: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        load_centerface_onnx(width, height), options, providers=["CPUExecutionProvider"]
    )


def _run(session: ort.InferenceSession, blob: npt.NDArray[np.float32]) -> dict[str, Any]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {INPUT_NAME: blob})))


@pytest.fixture(scope="module")
def detect() -> Iterator[Detector]:
    sessions: dict[tuple[int, int], ort.InferenceSession] = {}

    def run(frame: npt.NDArray[np.uint8], width: int, height: int) -> Detections:
        if (width, height) not in sessions:
            sessions[(width, height)] = _session(width, height)
        blob = preprocess_centerface(frame, width, height)
        return decode_centerface(_run(sessions[(width, height)], blob), width, height)

    yield run


def test_model_is_bundled() -> None:
    assert MODEL_PATH.is_file()
    assert (MODEL_PATH.parent / "CENTERFACE-LICENSE.txt").is_file()


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_session_shapes(width: int, height: int) -> None:
    session = _session(width, height)
    (model_input,) = session.get_inputs()
    assert model_input.name == INPUT_NAME
    assert model_input.shape == [1, 3, height, width]
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)
    outputs = _run(session, np.zeros((1, 3, height, width), np.float32))
    grid = [height // 4, width // 4]
    assert [list(outputs[n].shape) for n in OUTPUT_NAMES] == [
        [1, 1, *grid],
        [1, 2, *grid],
        [1, 2, *grid],
        [1, 10, *grid],
    ]


@pytest.mark.parametrize(("width", "height"), [(100, 320), (320, 100), (0, 320), (320, -32)])
def test_bad_size_is_rejected(width: int, height: int) -> None:
    bad = width if width in (100, 0) else height
    with pytest.raises(ValueError, match=str(bad)):
        load_centerface_onnx(width, height)
    frame = np.zeros((240, 320, 3), np.uint8)
    with pytest.raises(ValueError, match=str(bad)):
        preprocess_centerface(frame, width, height)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_preprocess_matches_blob_from_image(width: int, height: int) -> None:
    frame = _astronaut()
    blob = preprocess_centerface(frame, width, height)
    expected = cv2.dnn.blobFromImage(
        frame, 1.0, (width, height), (0, 0, 0), swapRB=True, crop=False
    )
    assert blob.dtype == np.float32
    assert blob.shape == (1, 3, height, width)
    assert blob.flags.c_contiguous
    np.testing.assert_array_equal(blob, expected)


def test_preprocess_channel_order_and_other_layouts() -> None:
    frame = np.zeros((64, 64, 3), np.uint8)
    frame[..., 0] = 10  # blue
    frame[..., 2] = 200  # red
    blob = preprocess_centerface(frame, 32, 32)
    # The network takes RGB, so red leads.
    assert blob[0, :, 0, 0].tolist() == [200.0, 0.0, 10.0]

    gray = np.full((64, 64), 7, np.uint8)
    assert preprocess_centerface(gray, 32, 32).tolist() == np.full((1, 3, 32, 32), 7.0).tolist()
    bgra = np.dstack([frame, np.full((64, 64), 255, np.uint8)])
    np.testing.assert_array_equal(preprocess_centerface(bgra, 32, 32), blob)

    with pytest.raises(ValueError, match="uint8"):
        preprocess_centerface(frame.astype(np.float32) / 255, 32, 32)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        preprocess_centerface(np.zeros((64, 64, 2), np.uint8), 32, 32)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_astronaut_has_exactly_one_face(detect: Detector, width: int, height: int) -> None:
    image = _astronaut()
    dets = detect(image, width, height)
    faces = [d for d in dets if d["prob"] > 0.5]
    assert len(faces) == 1, dets
    face = faces[0]
    assert face["label"] == 1
    assert face["prob"] > 0.8
    # Back to the 512x512 source with float scales, as the product does.
    sx, sy = image.shape[1] / width, image.shape[0] / height
    box = (face["xmin"] * sx, face["ymin"] * sy, face["xmax"] * sx, face["ymax"] * sy)
    assert _iou(box, ASTRONAUT_FACE) > 0.5, box


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_coffee_has_no_face(detect: Detector, width: int, height: int) -> None:
    dets = detect(_coffee(), width, height)
    assert [d for d in dets if d["prob"] > 0.5] == []


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_detections_are_well_formed(detect: Detector, width: int, height: int) -> None:
    dets = detect(_astronaut(), width, height)
    assert dets
    probs = [d["prob"] for d in dets]
    assert probs == sorted(probs, reverse=True)
    for d in dets:
        assert set(d) == {"label", "prob", "xmin", "ymin", "xmax", "ymax"}
        assert type(d["label"]) is int
        assert all(type(d[k]) is float for k in ("prob", "xmin", "ymin", "xmax", "ymax"))
        assert 0.0 <= d["xmin"] < d["xmax"] <= width
        assert 0.0 <= d["ymin"] < d["ymax"] <= height
        assert d["prob"] > 0.05


def _faces_over(dets: Detections, face: tuple[float, float, float, float],
                sx: float = 1.0, sy: float = 1.0) -> Detections:
    """The detections that lie mostly (over 30 % of their area) on ``face`` (frame pixels)."""
    over = []
    for d in dets:
        box = (d["xmin"] * sx, d["ymin"] * sy, d["xmax"] * sx, d["ymax"] * sy)
        inter_w = max(0.0, min(box[2], face[2]) - max(box[0], face[0]))
        inter_h = max(0.0, min(box[3], face[3]) - max(box[1], face[1]))
        if inter_w * inter_h > 0.3 * (box[2] - box[0]) * (box[3] - box[1]):
            over.append(d)
    return over


@pytest.mark.parametrize("margin", [0, 8, 16])
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_a_close_up_face_gets_one_box(detect: Detector, width: int, height: int,
                                      margin: int) -> None:
    # A face filling the frame, as in front of a webcam: CenterFace also fires off-centre with a
    # shifted box over the same face (0.45 at 640x480, IoU 0.29 with the best, which once passed
    # the 0.3 IoU suppression and showed as a second face over the default threshold).
    x0, y0, x1, y1 = (int(v) for v in ASTRONAUT_FACE)
    crop = _astronaut()[y0 - margin : y1 + margin, x0 - margin : x1 + margin]
    frame = np.asarray(cv2.resize(crop, None, fx=3, fy=3), dtype=np.uint8)
    dets = detect(frame, width, height)
    fh, fw = frame.shape[:2]
    over = _faces_over(dets, (0.0, 0.0, float(fw), float(fh)), fw / width, fh / height)
    assert len(over) == 1, dets
    assert over[0]["prob"] > SSD_DEFAULT_THRESHOLD


@pytest.mark.parametrize(("width", "height"), [(480, 288), *SIZES])
def test_the_astronaut_face_gets_one_box_at_any_threshold(detect: Detector, width: int,
                                                           height: int) -> None:
    dets = detect(_astronaut(), width, height)  # every box above the decoder's 0.05 floor
    over = _faces_over(dets, ASTRONAUT_FACE, 512 / width, 512 / height)
    assert len(over) == 1, dets


@pytest.mark.parametrize(("left", "right", "gap"), [(150, 295, 40), (150, 295, 0), (183, 262, 0)])
@pytest.mark.parametrize(("width", "height"), [(480, 288), *SIZES])
def test_two_faces_side_by_side_keep_two_boxes(detect: Detector, width: int, height: int,
                                               left: int, right: int, gap: int) -> None:
    # Two people side by side, at last cheek to cheek: suppressing a box mostly inside another
    # must not merge them.
    crop = _astronaut()[40:230, left:right]
    frame = np.ascontiguousarray(np.hstack([crop, np.zeros((190, gap, 3), np.uint8), crop]))
    dets = detect(frame, width, height)
    faces = [d for d in dets if d["prob"] > SSD_DEFAULT_THRESHOLD]
    assert len(faces) == 2, dets
    sx = frame.shape[1] / width
    first, second = sorted(faces, key=lambda d: d["xmin"])
    middle = crop.shape[1] + gap / 2
    assert first["xmin"] * sx < middle < second["xmax"] * sx
    assert (first["xmin"] + first["xmax"]) / 2 * sx < middle < (second["xmin"] + second["xmax"]) / 2 * sx


def _synthetic(width: int, height: int) -> dict[str, npt.NDArray[np.float32]]:
    grid = (height // 4, width // 4)
    return {
        HEATMAP: np.zeros((1, 1, *grid), np.float32),
        SCALE: np.zeros((1, 2, *grid), np.float32),
        OFFSET: np.zeros((1, 2, *grid), np.float32),
        LANDMARKS: np.zeros((1, 10, *grid), np.float32),
    }


def test_decode_geometry() -> None:
    outputs = _synthetic(64, 32)
    # A 40x20 (w x h) face centred on cell (row 3, col 5) shifted by a quarter cell.
    outputs[HEATMAP][0, 0, 3, 5] = 0.9
    outputs[SCALE][0, :, 3, 5] = [np.log(20 / 4), np.log(40 / 4)]
    outputs[OFFSET][0, :, 3, 5] = [0.25, 0.25]
    (det,) = decode_centerface(outputs, 64, 32)
    centre_x, centre_y = (5 + 0.25 + 0.5) * 4, (3 + 0.25 + 0.5) * 4
    assert det["label"] == 1
    assert det["prob"] == pytest.approx(0.9)
    assert det["xmin"] == pytest.approx(centre_x - 20)
    assert det["xmax"] == pytest.approx(centre_x + 20)
    assert det["ymin"] == pytest.approx(centre_y - 10)
    assert det["ymax"] == pytest.approx(centre_y + 10)


def test_decode_clips_to_the_input() -> None:
    outputs = _synthetic(64, 32)
    outputs[HEATMAP][0, 0, 0, 0] = 0.7
    outputs[SCALE][0, :, 0, 0] = np.log(100 / 4)
    (det,) = decode_centerface(outputs, 64, 32)
    assert (det["xmin"], det["ymin"], det["xmax"], det["ymax"]) == pytest.approx(
        (0.0, 0.0, 52.0, 32.0)
    )


def test_decode_nms_threshold_and_bound() -> None:
    outputs = _synthetic(320, 320)
    # A face lights up neighbouring cells: only the strongest survives NMS.
    outputs[SCALE][...] = np.log(32 / 4)
    outputs[HEATMAP][0, 0, 10, 10:13] = [0.6, 0.9, 0.7]
    # A separate, weaker face far away.
    outputs[HEATMAP][0, 0, 60, 60] = 0.3
    # Below the floor.
    outputs[HEATMAP][0, 0, 30, 30] = 0.04
    dets = decode_centerface(outputs, 320, 320)
    assert [round(float(d["prob"]), 6) for d in dets] == [0.9, 0.3]
    assert decode_centerface(outputs, 320, 320, threshold=0.5)[0]["prob"] == pytest.approx(0.9)
    # nms_iou=1.0 and nms_cover=1.0 disable suppression.
    assert len(decode_centerface(outputs, 320, 320, nms_iou=1.0, nms_cover=1.0)) == 4

    # Many separate faces: the list stays bounded, strongest first.
    outputs[SCALE][...] = 0.0
    rng = np.random.default_rng(0)
    outputs[HEATMAP][0, 0, ::2, ::2] = rng.uniform(0.1, 1.0, (40, 40))
    dets = decode_centerface(outputs, 320, 320)
    assert len(dets) == MAX_DETECTIONS
    assert dets[0]["prob"] == pytest.approx(float(outputs[HEATMAP].max()))
    assert len(decode_centerface(outputs, 320, 320, max_detections=5)) == 5


def test_decode_suppresses_a_box_mostly_inside_a_stronger_one() -> None:
    outputs = _synthetic(320, 320)
    # The best box, 64 px square at (42, 42); a weaker 32 px one nested in its corner (IoU 0.25,
    # all of it inside), and a weaker 64 px one beside it sharing 3/8 of its area (IoU 0.23).
    outputs[HEATMAP][0, 0, 10, 10] = 0.9
    outputs[SCALE][0, :, 10, 10] = np.log(64 / 4)
    outputs[HEATMAP][0, 0, 6, 6] = 0.5
    outputs[SCALE][0, :, 6, 6] = np.log(32 / 4)
    outputs[HEATMAP][0, 0, 10, 20] = 0.4
    outputs[SCALE][0, :, 10, 20] = np.log(64 / 4)
    dets = decode_centerface(outputs, 320, 320)
    assert [round(float(d["prob"]), 6) for d in dets] == [0.9, 0.4]
    assert len(decode_centerface(outputs, 320, 320, nms_cover=1.0)) == 3


def test_decode_empty_and_invalid() -> None:
    outputs = _synthetic(64, 32)
    assert decode_centerface(outputs, 64, 32) == []
    with pytest.raises(ValueError, match="shape"):
        decode_centerface(outputs, 32, 32)
    del outputs[SCALE]
    with pytest.raises(KeyError, match=SCALE):
        decode_centerface(outputs, 64, 32)


@pytest.mark.parametrize(("width", "height"), [(320, 320), (640, 480)])
def test_inference_time(width: int, height: int, request: pytest.FixtureRequest) -> None:
    session = _session(width, height)
    blob = preprocess_centerface(_astronaut(), width, height)
    _run(session, blob)  # warm-up: first run allocates
    times = []
    for _ in range(30):
        start = time.perf_counter()
        _run(session, blob)
        times.append((time.perf_counter() - start) * 1e3)
    median_ms = float(np.median(times))
    # user_properties rather than record_property: the latter warns (an error here) under
    # the default xunit2 junit family.
    request.node.user_properties.append((f"centerface_{width}x{height}_median_ms", median_ms))
    # Deliberately loose: this guards against a pathological regression (e.g. the graph
    # losing its constant folding), not against a busy CI machine.
    assert median_ms < 1000
