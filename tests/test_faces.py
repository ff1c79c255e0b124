"""Face detectors on real photos shipped inside installed packages (models/faces.py)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from _helpers_faces import astronaut, group_photo

from fairdiff_ray.config import FacesConfig
from fairdiff_ray.errors import ConfigError, ModelFileError
from fairdiff_ray.models.faces import (
    DlibDetector,
    InsightFaceDetector,
    build_detector,
    detector_class,
    dlib_to_arcface,
    face_crops,
    from_uint8,
    to_uint8,
)
from fairdiff_ray.models.protocols import FaceDetector


@pytest.fixture(scope="module")
def dlib_detector() -> DlibDetector:
    return DlibDetector()


def _inside(points: torch.Tensor, box: torch.Tensor) -> bool:
    return bool(((points >= box[:2]) & (points <= box[2:])).all())


def test_uint8_round_trip() -> None:
    img = astronaut()
    assert np.array_equal(to_uint8(from_uint8(img))[0], img)


def test_dlib_finds_the_six_faces_of_the_group_photo(dlib_detector: DlibDetector) -> None:
    (faces,) = dlib_detector.detect_all(from_uint8(group_photo()))
    assert faces.boxes.shape == (6, 4) and faces.landmarks.shape == (6, 5, 2)
    centres = (faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2
    # Six distinct people: no two boxes share a centre within a face width.
    dist = torch.cdist(centres, centres) + torch.eye(6) * 1e9
    assert dist.min() > 80
    for box, lm in zip(faces.boxes, faces.landmarks):
        assert _inside(lm[:3], box)  # eyes and nose inside the box
        assert lm[0, 0] < lm[1, 0]  # ArcFace order: the image-left eye first
        assert lm[3:, 1].min() > lm[:2, 1].max()  # mouth corners below both eyes


def test_dlib_finds_the_astronaut_and_nothing_in_a_blank_image(dlib_detector: DlibDetector) -> None:
    images = torch.cat(
        [from_uint8(astronaut()), torch.zeros(1, 3, 512, 512), torch.ones(1, 3, 512, 512) * 0.3]
    )
    assert isinstance(dlib_detector, FaceDetector)
    faces = dlib_detector.detect(images)
    assert faces.found.tolist() == [True, False, False]
    x0, y0, x1, y1 = faces.boxes[0].tolist()
    # Her face sits around (223, 127) in the 512 x 512 picture and is ~90 px wide.
    assert x0 < 223 < x1 and y0 < 127 < y1 and 60 < x1 - x0 < 140
    assert faces.scores[0] > 0
    assert torch.all(faces.boxes[1:] == 0) and torch.all(faces.landmarks[1:] == 0)


def test_largest_face_is_selected(dlib_detector: DlibDetector) -> None:
    images = from_uint8(group_photo())
    (every,) = dlib_detector.detect_all(images)
    largest = dlib_detector.detect(images)
    areas = (every.boxes[:, 2] - every.boxes[:, 0]) * (every.boxes[:, 3] - every.boxes[:, 1])
    torch.testing.assert_close(largest.boxes[0], every.boxes[areas.argmax()])


def test_dlib_to_arcface_on_a_known_layout() -> None:
    # dlib order: image-right eye (outer, inner), image-left eye (outer, inner), nose base.
    parts = np.array([[70.0, 50], [60, 50], [30, 50], [40, 50], [50, 70]])
    lm = dlib_to_arcface(parts)
    np.testing.assert_allclose(lm[:3], [[35, 50], [65, 50], [50, 70]])
    # Mouth corners: symmetric about the face's midline, ~1.15 eye distances below the eyes.
    np.testing.assert_allclose(lm[3, 0] + lm[4, 0], 100.0)
    assert 80 < lm[3, 1] == lm[4, 1] < 90 and lm[3, 0] < lm[4, 0]


def test_face_crops_carry_gradients_and_fill_missing_rows(dlib_detector: DlibDetector) -> None:
    images = torch.cat([from_uint8(astronaut()), torch.zeros(1, 3, 512, 512)]).requires_grad_()
    faces, crops = face_crops(images, dlib_detector, expand=0.5, size=64)
    assert crops.shape == (2, 3, 64, 64) and faces.found.tolist() == [True, False]
    crops[0].sum().backward()
    grad = images.grad[0].abs().sum(0)
    assert grad[127, 223] > 0 and grad[500, 500] == 0  # the face gets gradient, far-away pixels none
    assert images.grad[1].abs().sum() == 0


def test_insightface_missing_pack_is_a_model_file_error_without_network(tmp_path, monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ModelFileError, match="is not a directory"):
        InsightFaceDetector(tmp_path / "buffalo_l")
    with pytest.raises(ModelFileError, match="holds no detector"):
        InsightFaceDetector(tmp_path)
    (tmp_path / "det_10g.onnx").write_bytes(b"truncated download")
    with pytest.raises(ModelFileError, match="could not be loaded"):
        InsightFaceDetector(tmp_path)
    with pytest.raises(ConfigError, match="faces.insightface_pack"):
        build_detector(FacesConfig(detector="insightface"))


def test_build_detector_dlib() -> None:
    det = build_detector(FacesConfig(detector="dlib", dlib_upsample=1))
    assert isinstance(det, DlibDetector) and det.upsample == 1


def test_detector_class_tells_what_a_detector_can_do_without_weights() -> None:
    # the preflight asks it whether loss.lambda_presence has a differentiable face score to work with
    from fairdiff_ray.synthetic.nets import SyntheticDetector

    assert detector_class("synthetic") is SyntheticDetector and callable(SyntheticDetector.presence_logit)
    for kind in ("dlib", "insightface"):
        assert getattr(detector_class(kind), "presence_logit", None) is None
    with pytest.raises(ConfigError, match="faces.detector='mtcnn' is unknown"):
        detector_class("mtcnn")
