"""engine/models/train_shapes.py: deterministic data, one token per caption word, and a smoke
run that saves a pipeline which reloads offline and generates."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from engine.models import train_shapes as ts


def test_dataset_is_deterministic_per_seed():
    a_img, a_cap = ts.make_dataset(8, 32, seed=3)
    b_img, b_cap = ts.make_dataset(8, 32, seed=3)
    c_img, c_cap = ts.make_dataset(8, 32, seed=4)
    assert a_img.shape == (8, 32, 32, 3) and a_img.dtype == np.uint8
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    assert not np.array_equal(a_img, c_img)
    # A sample depends on its index only, not on how many were asked for.
    tail_img, tail_cap = ts.make_dataset(3, 32, seed=3, start=5)
    assert np.array_equal(tail_img, a_img[5:]) and tail_cap == a_cap[5:]


def test_captions_match_the_drawing():
    rng = np.random.default_rng(0)
    means = {"dark": [], "light": []}
    for _ in range(60):
        scene = ts.random_scene(rng)
        img = ts.draw_scene(scene, 64).astype(int)
        text = ts.caption(scene)
        assert text.endswith(f"on a {scene['background']} background")
        assert 1 <= len(scene["shapes"]) <= 2
        # The words name what is drawn, left to right.
        assert [w for w in text.split() if w in ts.COLOURS] == [s["colour"] for s in scene["shapes"]]
        assert [w for w in text.split() if w in ts.SHAPES] == [s["shape"] for s in scene["shapes"]]
        for s in scene["shapes"]:
            # The pixel at a shape's centre has the shape's named colour (up to the jitter).
            centre = img[int(s["cy"] * 64), int(s["cx"] * 64)]
            assert np.abs(centre - np.array(ts.COLOURS[s["colour"]])).max() <= ts.JITTER + 1, (text, centre)
        # Corners are background (shapes are at most 0.22 of the side in radius).
        corner_means = [img[y, x].mean() for y in (0, -1) for x in (0, -1)]
        means[scene["background"]].append(np.mean(corner_means))
        assert not ({"white", "light"} <= set(text.split()))
    assert means["dark"] and means["light"]
    assert max(means["dark"]) < 60 < 190 < min(means["light"])


def test_scenes_look_the_same_at_every_size():
    scene = ts.random_scene(np.random.default_rng(7))
    small = ts.draw_scene(scene, 32).astype(float)
    big = ts.draw_scene(scene, 64).astype(float)
    down = big.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    assert np.abs(down - small).mean() < 3.0


def test_every_caption_word_is_one_token():
    tok = ts.build_tokenizer()
    for word in ts.CAPTION_WORDS:
        assert len(tok.tokenize(word)) == 1, (word, tok.tokenize(word))
    # Distinct words get distinct ids, also inside a full caption (the context of other words
    # must not change the split: "red" merges must not split "green").
    text = "a red circle and a green square on a light background"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == len(text.split()) + 2
    assert tok.decode(ids, skip_special_tokens=True) == text
    # Unknown words still tokenize, character by character, with no unknown token.
    zebra = tok("zebra").input_ids[1:-1]
    assert len(zebra) == 5 and tok.unk_token_id not in zebra
    assert tok.model_max_length == 77


def test_bpe_merges_survive_words_sharing_letters():
    words = ["red", "green", "ere", "r"]
    merges = ts.bpe_merges(words)
    assert len(set(merges)) == len(merges)
    tok = ts.build_tokenizer(words)
    assert [len(tok.tokenize(w)) for w in words] == [1, 1, 1, 1]


def test_parse_args_rejects_sizes_the_unet_cannot_halve():
    with pytest.raises(SystemExit):
        ts.parse_args(["--out", "x", "--sizes", "48"])  # factor 8 x 4 = 32 must divide
    assert ts.parse_args(["--out", "x", "--sizes", "48", "--vae-factor", "4"]).sizes == [48]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "model"
    args = ts.parse_args([
        "--out", str(out), "--sizes", "32", "--batch-size", "4", "--vae-steps", "3", "--unet-steps", "3",
        "--threads", "1", "--eval-images", "4", "--sample-steps", "2", "--checkpoint-minutes", "0",
    ])
    start = time.monotonic()
    report = ts.train(args)
    return args, report, time.monotonic() - start


def test_smoke_training_saves_a_pipeline_that_reloads_and_generates(smoke):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    args, report, seconds = smoke
    assert seconds < 45
    assert report["vae"]["step"] == 3 and report["unet"]["step"] == 3
    assert report["unet"]["stopped"] == "steps"
    assert np.isfinite(report["vae"]["loss"]) and np.isfinite(report["unet"]["loss"])
    assert report["weights_mb"] <= 15

    pipe = StableDiffusionPipeline.from_pretrained(args.out)  # HF_HUB_OFFLINE=1 (conftest)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.safety_checker is None
    assert pipe.vae.config.scaling_factor == pytest.approx(report["vae"]["scaling_factor"])
    assert all(len(pipe.tokenizer.tokenize(w)) == 1 for w in ts.CAPTION_WORDS)
    image = pipe("a red circle on a dark background", height=32, width=64, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (32, 64, 3) and np.isfinite(image).all()

    with open(os.path.join(args.out, "training.json")) as f:
        saved = json.load(f)
    assert saved["config"]["sizes"] == [32] and saved["unet"]["step"] == 3
    assert saved["vae"]["psnr_db"]["32"] > 0
    samples = os.path.join(args.out, "samples.png")
    from PIL import Image

    assert Image.open(samples).size == (32 * len(ts.SAMPLE_PROMPTS), 32)


def test_resume_continues_from_checkpoints(smoke):
    args, report, _ = smoke
    ckpt = os.path.join(args.out, "checkpoints")
    assert {"vae.pt", "unet.pt", "text_encoder.pt"} <= set(os.listdir(ckpt))
    more = ts.parse_args([
        "--out", args.out, "--sizes", "32", "--batch-size", "4", "--vae-steps", "3", "--unet-steps", "5",
        "--threads", "1", "--eval-images", "4", "--sample-steps", "2", "--resume",
    ])
    resumed = ts.train(more)
    assert resumed["vae"]["stopped"] == "unet already started"  # the VAE is not retrained
    assert resumed["vae"]["scaling_factor"] == report["vae"]["scaling_factor"]
    assert resumed["unet"]["step"] == 5  # 3 from before + 2 more
