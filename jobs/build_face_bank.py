"""Embed a folder of real faces into a face bank (the L_face targets of images asked to change).

    fairdiff build-face-bank --faces data/real-faces --embedder models/arcface-r50 --out models/face_bank.safetensors
    (then features.face_embedder=models/arcface-r50 features.face_bank=models/face_bank.safetensors)

Face-embedder format and conversion from arcface_torch: fairdiff_ray/models/features.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairdiff_ray.jobs_common import run_job  # noqa: E402


def main(argv: list[str]) -> int:
    from fairdiff_ray.config import FacesConfig
    from fairdiff_ray.io import check_output_dir
    from fairdiff_ray.models.face_bank import build_face_bank
    from fairdiff_ray.models.faces import build_detector
    from fairdiff_ray.models.features import load_face_embedder

    p = argparse.ArgumentParser(prog="fairdiff build-face-bank", description=__doc__.splitlines()[0])
    p.add_argument("--faces", required=True, help="folder of photos (searched recursively)")
    p.add_argument("--embedder", required=True, help="face-embedder directory (config.json + model.safetensors)")
    p.add_argument("--out", required=True, help="bank file to write (.safetensors)")
    p.add_argument("--detector", choices=["dlib", "insightface"], default="dlib")
    p.add_argument("--insightface-pack", default=None, help="InsightFace pack directory for --detector insightface")
    p.add_argument("--largest-only", action="store_true", help="one face per photo (the largest)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    check_output_dir(a.out, a.overwrite, "--out")
    detector = build_detector(FacesConfig(detector=a.detector, insightface_pack=a.insightface_pack))
    embedder = load_face_embedder(a.embedder, key="--embedder")
    path, n = build_face_bank(a.faces, detector, embedder, a.out, a.largest_only)
    print(f"face bank: {path} ({n} faces)")
    return 0


if __name__ == "__main__":
    run_job(main)
