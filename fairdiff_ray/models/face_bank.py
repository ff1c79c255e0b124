"""Face banks: embeddings of real faces, the L_face targets for images asked to change (METHOD.md section 3).

``build_face_bank`` detects faces in a folder of photos, aligns each to the 112x112 ArcFace template with its
five landmarks and embeds it (mirror-averaged) with the configured face embedder. The bank is a safetensors
file with one (M, D) tensor ``embeddings`` (models/features.py ``load_face_bank``) and a JSON sidecar naming
the source image of every row.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fairdiff_ray.core.crop import align_faces
from fairdiff_ray.errors import DataError
from fairdiff_ray.models.faces import from_uint8
from fairdiff_ray.models.protocols import FaceDetector, FaceEmbedder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_files(folder: str | Path) -> list[Path]:
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise DataError(f"--faces {p} is not a directory of photos")
    files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"--faces {p} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


@torch.no_grad()
def embed_faces(
    files: list[Path], detector: FaceDetector, embedder: FaceEmbedder, largest_only: bool = False
) -> tuple[torch.Tensor, list[str]]:
    """(M, D) embeddings of the faces in ``files`` (every face, or the largest per image) and their sources."""
    rows, sources = [], []
    for f in files:
        image = from_uint8(np.asarray(Image.open(f).convert("RGB")))
        if largest_only or not hasattr(detector, "detect_all"):
            faces = detector.detect(image)
            landmarks = faces.landmarks[faces.found]
        else:
            landmarks = detector.detect_all(image)[0].landmarks
        if len(landmarks):
            aligned = align_faces(image.expand(len(landmarks), -1, -1, -1), landmarks.float())
            rows.append(embedder(aligned).float().cpu())
            sources += [f"{f}#{k}" for k in range(len(landmarks))]
    if not rows:
        raise DataError(f"no face was detected in the {len(files)} image(s): check the photos or the detector")
    return torch.cat(rows), sources


def build_face_bank(
    faces_dir: str, detector: FaceDetector, embedder: FaceEmbedder, out: str, largest_only: bool = False
) -> tuple[Path, int]:
    """Embed every face under ``faces_dir`` and write the bank to ``out`` (+ ``out``.json). Returns (path, M)."""
    from fairdiff_ray.io import atomic_write_text
    from fairdiff_ray.models.features import save_face_bank

    bank, sources = embed_faces(image_files(faces_dir), detector, embedder, largest_only)
    path = save_face_bank(bank, out)
    meta = {"faces": len(sources), "dim": int(bank.shape[1]), "source": str(faces_dir), "rows": sources}
    atomic_write_text(f"{path}.json", json.dumps(meta, indent=2))
    return path, len(sources)
