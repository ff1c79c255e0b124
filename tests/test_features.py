"""models/features.py: CLIP / DINOv2 / IResNet loaders from local dirs, gradients to pixels, face banks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _helpers_features import tiny_clip_dir, tiny_dino_dir, tiny_embedder_dir, tiny_full_clip_dir

from fairdiff_ray.config import FeaturesConfig
from fairdiff_ray.errors import ModelFileError
from fairdiff_ray.models.features import (
    IResNet,
    build_face_embedder,
    build_features,
    convert_arcface,
    load_face_bank,
    load_face_embedder,
    resize_center_crop,
    save_face_bank,
)
from fairdiff_ray.models.protocols import FaceEmbedder, ImageFeatures


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("nets")
    return {"clip": tiny_clip_dir(root), "dino": tiny_dino_dir(root), "embedder": tiny_embedder_dir(root)}


def _images(n: int = 2, h: int = 48, w: int = 64) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_build_features_only_the_configured_nets(dirs) -> None:
    assert build_features(FeaturesConfig()) == {}
    nets = build_features(FeaturesConfig(clip=str(dirs["clip"])))
    assert list(nets) == ["clip"]
    nets = build_features(FeaturesConfig(clip=str(dirs["clip"]), dino=str(dirs["dino"])))
    assert list(nets) == ["clip", "dino"]
    for name, net in nets.items():
        assert isinstance(net, ImageFeatures) and net.name == name
        assert all(not p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("name", ["clip", "dino"])
def test_features_are_unit_vectors_with_gradients_to_the_pixels(dirs, name) -> None:
    net = build_features(FeaturesConfig(**{name: str(dirs[name])}))[name]
    images = _images().requires_grad_()
    emb = net(images)
    assert emb.shape[0] == 2 and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    # a fixed random direction, not the plain sum: DINOv2's pooler output is a LayerNorm, whose entries sum to the
    # bias sum whatever the input (freshly initialised: weight 1, bias 0), so the sum has no gradient at all
    probe = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(1))
    (emb[0] * probe).sum().backward()
    g = images.grad
    assert g[0].abs().sum() > 0 and g[1].abs().sum() == 0  # per-image, and reaches image 0's pixels
    # different images -> different embeddings; the same image -> the same one
    assert not torch.allclose(emb[0], emb[1])
    torch.testing.assert_close(net(images[:1].detach()), emb[:1].detach())


def test_loaded_clip_matches_the_reference_pipeline(dirs) -> None:
    # Against transformers' own model run on hand-normalised pixels: the loader must not re-init weights.
    from transformers import CLIPVisionModelWithProjection

    ref = CLIPVisionModelWithProjection.from_pretrained(str(dirs["clip"])).eval()
    net = build_features(FeaturesConfig(clip=str(dirs["clip"])))["clip"]
    x = _images(2, 32, 32)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = torch.nn.functional.normalize(ref(pixel_values=((x + 1) / 2 - mean) / std).image_embeds, dim=-1)
        torch.testing.assert_close(net(x), want)


def test_resize_center_crop_geometry() -> None:
    x = torch.arange(4 * 8, dtype=torch.float32).view(1, 1, 4, 8).expand(1, 3, 4, 8)
    out = resize_center_crop(x, 4)
    assert out.shape == (1, 3, 4, 4)
    torch.testing.assert_close(out, x[..., 2:6])  # no resize needed: a pure centre crop


def test_missing_dirs_are_one_line_model_file_errors(tmp_path) -> None:
    with pytest.raises(ModelFileError, match="features.clip: .* huggingface-cli download openai/clip"):
        build_features(FeaturesConfig(clip=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="features.dino: .*config.json"):
        build_features(FeaturesConfig(dino=str(tmp_path / "empty")))
    with pytest.raises(ModelFileError, match="face_embedder"):
        build_face_embedder(FeaturesConfig(face_embedder=str(tmp_path / "empty")))
    with pytest.raises(ModelFileError, match="build-face-bank"):
        load_face_bank(str(tmp_path / "bank.safetensors"))


def test_face_embedder_mirror_average_and_gradients(dirs) -> None:
    emb = build_face_embedder(FeaturesConfig(face_embedder=str(dirs["embedder"])))
    assert isinstance(emb, FaceEmbedder) and build_face_embedder(FeaturesConfig()) is None
    faces = _images(3, 112, 112).requires_grad_()
    e = emb(faces)
    assert e.shape == (3, 32)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    # averaged with its mirror: a face and its mirror image get the same embedding
    torch.testing.assert_close(emb(faces.detach().flip(-1)), e.detach(), atol=1e-5, rtol=1e-5)
    e[1].sum().backward()
    assert faces.grad[1].abs().sum() > 0 and faces.grad[0].abs().sum() == 0


def test_arcface_torch_checkpoint_converts_without_renaming(tmp_path) -> None:
    net = IResNet([1, 2, 1, 1], [8, 8, 16, 16], embedding_size=24).eval()
    torch.save(net.state_dict(), tmp_path / "backbone.pth")
    out = convert_arcface(str(tmp_path / "backbone.pth"), str(tmp_path / "conv"), [1, 2, 1, 1])
    loaded = load_face_embedder(out)
    x = _images(1, 112, 112)
    with torch.no_grad():
        want = torch.nn.functional.normalize(net(x) + net(x.flip(-1)), dim=-1)
        torch.testing.assert_close(loaded(x), want)


def test_face_bank_roundtrip_is_normalised(tmp_path) -> None:
    bank = torch.randn(5, 7) * 3
    save_face_bank(bank, tmp_path / "bank.safetensors")
    got = load_face_bank(str(tmp_path / "bank.safetensors"))
    torch.testing.assert_close(got, torch.nn.functional.normalize(bank, dim=-1))
    assert load_face_bank(None) is None


def test_build_face_bank_cli_embeds_every_detected_face(dirs, tmp_path) -> None:
    from _helpers_faces import astronaut, group_photo
    from PIL import Image

    from fairdiff_ray.cli import main as cli_main
    from fairdiff_ray.core.crop import align_faces
    from fairdiff_ray.models.faces import DlibDetector, from_uint8

    faces = tmp_path / "faces"
    (faces / "sub").mkdir(parents=True)
    Image.fromarray(astronaut()).save(faces / "astronaut.png")
    Image.fromarray(group_photo()).save(faces / "sub" / "t1.jpg", quality=95)
    Image.new("RGB", (64, 64), (128, 128, 128)).save(faces / "blank.png")  # no face: contributes nothing
    out = tmp_path / "bank.safetensors"
    args = ["build-face-bank", "--faces", str(faces), "--embedder", str(dirs["embedder"]), "--out", str(out)]
    assert cli_main(args) == 0
    bank = load_face_bank(str(out))
    assert bank.shape == (7, 32)  # the astronaut + the six people of t1.jpg
    # row 0 is the astronaut's face, embedded exactly as the loss embeds faces
    image = from_uint8(astronaut())
    lm = DlibDetector().detect(image).landmarks
    emb = load_face_embedder(dirs["embedder"])
    with torch.no_grad():
        torch.testing.assert_close(bank[0], emb(align_faces(image, lm))[0], atol=1e-5, rtol=1e-5)
    assert cli_main(args) == 2  # refuses to overwrite
    assert cli_main([*args, "--overwrite", "--largest-only"]) == 0
    assert load_face_bank(str(out)).shape == (2, 32)
    (tmp_path / "empty").mkdir()
    assert cli_main(["build-face-bank", "--faces", str(tmp_path / "empty"), "--embedder", str(dirs["embedder"]),
                     "--out", str(tmp_path / "b2.safetensors")]) == 2
    assert not (tmp_path / "b2.safetensors").exists()


def test_clip_t_text_side_and_scored_cosine(tmp_path: Path) -> None:
    """CLIP-T: the text tower of a full CLIP directory embeds prompts as the stock CLIPModel does; the
    evaluation's scorer writes sem_clip_t = cos(image, prompt); a vision-only export has no text side."""
    import numpy as np
    import torch.nn.functional as F
    from transformers import AutoTokenizer, CLIPModel

    from fairdiff_ray.eval.stages import ScoreImages
    from fairdiff_ray.models.features import build_features, load_clip_text
    from tests._helpers_eval import standin_score_loader

    d = tiny_full_clip_dir(tmp_path)
    text = load_clip_text(d)
    prompts = ["A photo of the face of a nurse, a person", "A photo of the face of a pilot, a person",
               "A photo of the face of a nurse, a person"]
    got = text(prompts)
    model, tok = CLIPModel.from_pretrained(str(d)).eval(), AutoTokenizer.from_pretrained(str(d))
    with torch.no_grad():
        pooled = model.text_model(**tok(prompts, padding=True, return_tensors="pt")).pooler_output
        ref = F.normalize(model.text_projection(pooled), dim=-1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    assert torch.equal(got[0], got[2]) and not torch.allclose(got[0], got[1])
    assert load_clip_text(tiny_clip_dir(tmp_path)) is None  # vision only

    clip = build_features(FeaturesConfig(clip=str(d)))["clip"]

    def loader(spec):
        return {**standin_score_loader(spec), "features": {"clip": clip}, "clip_text": text}

    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), "prompt": np.array(prompts, dtype=object),
             "j": np.array([0, 1, 2])}
    out = ScoreImages({"grid_images": 0}, loader)(batch)
    with torch.no_grad():
        img = clip(torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).float() / 127.5 - 1)
    np.testing.assert_allclose(out["sem_clip_t"], (img * got).sum(-1).numpy(), atol=1e-5)
