"""The generated world (drawing and read-back), the evaluation metrics on known cases,
and ``infiniteid evaluate`` end to end on the tiny model."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from infiniteid.cli import main
from infiniteid.evaluation import world as W
from infiniteid.evaluation.harness import identity_references, world_prompts
from infiniteid.evaluation.metrics import ClipScorer, FaceScorer, MetricsError
from infiniteid.face import FaceEmbedder, write_synthetic_face_models


@pytest.fixture(scope="module")
def face_models(tmp_path_factory):
    return write_synthetic_face_models(tmp_path_factory.mktemp("face") / "models")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny random CLIP (transformers CLIPModel + tokenizer + image processor) saved as a local folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    from infiniteid.model.tiny import BOS, EOS, tiny_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    tok = tiny_tokenizer(EOS).tokenizer
    ids = dict(bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS), pad_token_id=tok.token_to_id(EOS))
    small = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig(text_config=dict(vocab_size=320, max_position_embeddings=77, **ids, **small),
                                     vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16))
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                            model_max_length=77).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_world_attributes_read_back_exactly():
    rng = np.random.default_rng(7)
    for _ in range(60):
        person, scene = W.Identity.random(rng), W.Scene.random(rng)
        for size in (64, 128):
            assert W.measure(W.render(person, scene, size, jitter=0.01, rng=rng)) == W.expected(person, scene)
    assert W.parse_caption(W.caption(W.Scene("snow", "green", "night"))) == W.Scene("snow", "green", "night")
    assert W.parse_caption("a photo of a person") is None


def test_identity_chance_is_two_random_people_agreeing():
    """Exact values from the world's definition (4 skins, 3 of each other attribute, glasses
    half the time; bald people read hair colour "none": 1/3, the three colours 2/9 each),
    checked against 20000 random pairs of people (standard error of the mean ~0.002)."""
    chance = W.identity_chance()
    assert chance["skin"] == pytest.approx(1 / 4) and chance["glasses"] == pytest.approx(1 / 2)
    assert chance["hair_colour"] == pytest.approx((1 / 3) ** 2 + 3 * (2 / 9) ** 2)
    assert chance["mean"] == pytest.approx((1 / 4 + 3 / 3 + 7 / 27 + 1 / 2) / 6)
    rng = np.random.default_rng(11)
    pairs = [(W.expected(W.Identity.random(rng), W.Scene()), W.expected(W.Identity.random(rng), W.Scene()))
             for _ in range(20000)]
    agree = np.mean([a[k] == b[k] for a, b in pairs for k in W.IDENTITY_ATTRIBUTES])
    assert abs(agree - chance["mean"]) < 0.01


def test_world_folders_are_training_data_the_face_front_end_detects(tmp_path, face_models):
    root = W.write_world(tmp_path / "w", identities=3, photos=2, size=128, seed=1)
    meta = json.loads((root / "world.json").read_text())
    assert len(meta["photos"]) == 6 and sorted(p.name for p in root.iterdir()) == [
        "person-00", "person-01", "person-02", "world.json"]
    embedder = FaceEmbedder.from_folder(face_models)
    for rec in meta["photos"]:
        img = np.asarray(Image.open(root / rec["path"]).convert("RGB"))
        assert W.measure(img) == W.expected(W.identity_from_dict(rec["identity"]), W.Scene(**rec["scene"]))
        r = embedder.embed(img)
        np.testing.assert_allclose(r.bbox, [32, 32, 96, 96])  # the middle half: the scripted box
        caption = (root / rec["path"]).with_suffix(".txt").read_text().strip()
        assert W.parse_caption(caption) == W.Scene(**rec["scene"])
    assert [n for n, _ in identity_references(root)] == ["person-00", "person-01", "person-02"]


def cosine_matrix(x, y):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    return x @ y.T


def test_metrics_known_cases(clip_folder, face_models):
    clip, face = ClipScorer(clip_folder), FaceScorer(face_models)
    rng = np.random.default_rng(3)
    people = []
    while len(people) < 5:
        p = W.Identity.random(rng)
        if p not in people:
            people.append(p)
    scene = W.Scene("city", "blue", "day")
    a = [W.render(p, scene, 128, 0.01, np.random.default_rng(1)) for p in people]
    b = [W.render(p, scene, 128, 0.01, np.random.default_rng(2)) for p in people]  # same people, shifted
    c = [W.render(p, W.Scene("forest", "red", "day"), 128) for p in people]  # same people, another scene
    # An image against itself: 1.
    np.testing.assert_allclose(clip.clip_i(a, a), 1.0, atol=1e-6)
    np.testing.assert_allclose(face.similarity(a, a), 1.0, atol=1e-6)
    # Two renders of one person score higher than two different people (every pair).
    clip_sim = cosine_matrix(clip.image_embeds(a), clip.image_embeds(b))
    face_sim = cosine_matrix(np.stack([face.embedding(x) for x in a]), np.stack([face.embedding(x) for x in c]))
    np.testing.assert_allclose(np.diag(clip_sim), clip.clip_i(a, b), atol=1e-6)
    for sim in (clip_sim, face_sim):
        off = sim[~np.eye(len(people), dtype=bool)].reshape(len(people), -1)
        assert np.all(np.diag(sim)[:, None] > off), sim
    t = clip.clip_t(a[:2], ["a photo of a man", "a red hat"])
    assert t.shape == (2,) and np.all(np.abs(t) <= 1)
    blank = np.full((128, 128, 3), 90, np.uint8)
    assert face.similarity([blank], [a[0]]) == [None]  # no face: reported as None, never a number
    with pytest.raises(MetricsError, match="CLIP folder not found"):
        ClipScorer(clip_folder / "missing")


def test_evaluate_command_on_the_tiny_model(tmp_path, face_models, clip_folder, capsys):
    refs = W.write_world(tmp_path / "w", identities=2, photos=1, size=128, seed=2)
    out = tmp_path / "eval"
    rc = main(["evaluate", "--tiny", "--references", str(refs), "--face-models", str(face_models),
               "--clip", str(clip_folder), "--world", "--num-prompts", "2", "--height", "64", "--width", "64",
               "--steps", "2", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert len(res["rows"]) == 4 and res["source"]["model"] == "tiny(seed=0) untrained"
    assert {r["prompt"] for r in res["rows"]} == set(world_prompts(2))
    for k in ("clip_t", "clip_i", "identity_acc", "prompt_acc", "text_prompt_acc"):
        assert isinstance(res["means"][k], float)
    md = (out / "report.md").read_text()
    assert "| Infinite-ID (paper) | 0.340 | 0.913 | 0.689 |" in md and "Generated-world attributes" in md
    by_attr = res["identity_by_attribute"]
    assert set(by_attr) == set(W.IDENTITY_ATTRIBUTES)  # each attribute's mean; their mean is identity_acc
    assert abs(np.mean(list(by_attr.values())) - res["means"]["identity_acc"]) < 1e-9
    assert res["identity_chance"]["glasses"] == 0.5 and f"| glasses | {by_attr['glasses']:.3f} | 0.500 |" in md
    assert Image.open(out / "contact_sheet.png").size == (3 * 128, 2 * 128 + 24)
    assert len(list((out / "images").glob("*.png"))) == 4
    assert main(["evaluate", "--tiny", "--references", str(refs), "--out", str(out)]) == 1
    assert "give prompts" in capsys.readouterr().err


@pytest.mark.heavy  # ~17 s on two idle cores (exports the tiny bundle); the parity itself is tested in test_training
def test_evaluate_command_on_a_runtime_bundle(tmp_path, face_models):
    from infiniteid.commands.demo import tiny_bundle

    bundle = tiny_bundle(tmp_path / "cache", progress=False)
    refs = W.write_world(tmp_path / "w", identities=2, photos=1, size=128, seed=2)
    common = ["--references", str(refs), "--face-models", str(face_models), "--world", "--num-prompts", "1",
              "--height", "64", "--width", "64", "--steps", "2", "--no-progress"]
    assert main(["evaluate", "--bundle", str(bundle), *common, "--out", str(tmp_path / "rt")]) == 0
    assert main(["evaluate", "--tiny", *common, "--out", str(tmp_path / "ref")]) == 0
    rt = json.loads((tmp_path / "rt" / "results.json").read_text())
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert rt["source"]["backend"] == "ort" and ref["source"]["backend"] == "reference"
    for a, b in zip(rt["rows"], ref["rows"]):  # the same model on two backends: the same images
        x = np.asarray(Image.open(tmp_path / "rt" / a["image"]), np.int16)
        y = np.asarray(Image.open(tmp_path / "ref" / b["image"]), np.int16)
        assert np.abs(x - y).max() <= 2


def test_world_command(tmp_path, capsys):
    assert main(["world", "--out", str(tmp_path / "w"), "--identities", "2", "--photos", "2", "--size", "64"]) == 0
    assert len(list((tmp_path / "w" / "people").glob("person-*/*.png"))) == 4
    assert (tmp_path / "w" / "face-models" / "synthetic_scrfd.onnx").is_file()
    assert main(["world", "--out", str(tmp_path / "w")]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["world", "--out", str(tmp_path / "x"), "--size", "32"]) == 1
    assert "at least 64" in capsys.readouterr().err


def test_world_exclude_draws_only_new_people(tmp_path, capsys):
    """A held-out set of people never seen in training: 640 of the 648 people are taken, so the
    8 left must be exactly the ones drawn; one more is an error, as is a folder without world.json."""
    assert main(["world", "--out", str(tmp_path / "train"), "--identities", "640", "--photos", "1", "--size", "64"]) == 0
    assert main(["world", "--out", str(tmp_path / "new"), "--identities", "8", "--photos", "1", "--size", "64",
                 "--exclude", str(tmp_path / "train"), "--seed", "5"]) == 0
    seen = set(W.world_identities(tmp_path / "train" / "people"))
    new = W.world_identities(tmp_path / "new" / "people")
    assert len(seen) == 640 and len(new) == 8 and not seen & set(new)
    assert len(seen | set(new)) == W.distinct_identities() == 648
    capsys.readouterr()
    assert main(["world", "--out", str(tmp_path / "x"), "--identities", "9", "--exclude", str(tmp_path / "train")]) == 1
    assert "at most 8" in capsys.readouterr().err
    assert main(["world", "--out", str(tmp_path / "y"), "--exclude", str(tmp_path / "nothing")]) == 1
    assert "no world.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="besides the excluded"):
        W.write_world(tmp_path / "z", identities=9, photos=1, size=64, exclude=list(seen))
