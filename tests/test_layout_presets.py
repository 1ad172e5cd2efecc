"""The layout presets (`sdxl-layout`, `pixart-layout`, `flux-layout`): the published
denoiser's module graph at narrow widths. Their self-attention layers, halo convs and
GroupNorms (the cost model's census), transformer blocks and module graphs equal those of
the published config built on the `meta` device; only width fields differ from its config."""

from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks.costmodel import CONFIG_DIR, MODELS, _load_model, census, census_of
from engine.models import denoiser_of, describe_model, info_from_pipeline
from engine.models.presets import PRESET_INFO, PRESETS
from engine.models.presets_layout import NARROWED, PUBLISHED

# preset -> the cost model's key for the same published config
KEYS = {"sdxl-layout": "sdxl", "pixart-layout": "pixart-sigma", "flux-layout": "flux1-dev"}
LAYOUTS = list(KEYS)
PIXELS = 256  # census resolution: 32x32 latents


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="module")
def pipes():
    return {name: PRESETS[name]() for name in LAYOUTS}


def _published_config(name: str) -> dict:
    with open(os.path.join(CONFIG_DIR, PUBLISHED[name])) as f:
        return json.load(f)


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _inputs(key: str, config, batch: int, h: int, w: int):
    """One denoiser call's inputs at the preset's (narrow) widths, like costmodel._inputs."""
    t = torch.full((batch,), 500.0)
    if key == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        return (torch.randn(batch, 4, h, w), t, torch.randn(batch, 77, config.cross_attention_dim)), {
            "added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled), "time_ids": torch.randn(batch, 6)}}
    if key == "pixart-sigma":
        return (torch.randn(batch, 4, h, w),), {
            "encoder_hidden_states": torch.randn(batch, 300, config.caption_channels), "timestep": t,
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    tokens = (h // 2) * (w // 2)
    return (torch.randn(batch, tokens, config.in_channels),), {
        "encoder_hidden_states": torch.randn(batch, 512, config.joint_attention_dim),
        "pooled_projections": torch.randn(batch, config.pooled_projection_dim), "timestep": t / 1000,
        "img_ids": torch.zeros(tokens, 3), "txt_ids": torch.zeros(512, 3), "guidance": torch.full((batch,), 3.5)}


@pytest.mark.parametrize("name", LAYOUTS)
def test_census_equals_the_published_model(name, pipes):
    """Same self-attention layers (batch, tokens, rows per layer), same halo convs (batch,
    rows, columns, halo per conv) and the same number of GroupNorm calls, in the same order."""
    key = KEYS[name]
    spec = MODELS[key]
    assert spec.config == PUBLISHED[name]
    published = census(key, PIXELS)  # the published config on the meta device
    denoiser = denoiser_of(pipes[name])
    h = w = PIXELS // spec.vae_factor
    args, kwargs = _inputs(key, denoiser.config, spec.batch, h, w)
    mine = census_of(denoiser, spec, h, w, args, kwargs)

    assert len(mine.attn) == len(published.attn)
    assert len(mine.convs) == len(published.convs)
    assert mine.norms == published.norms
    assert [(b, t, rows) for b, t, _, _, rows in mine.attn] == [(b, t, rows) for b, t, _, _, rows in published.attn]
    assert [(b, r, c, k) for b, _, r, c, k in mine.convs] == [(b, r, c, k) for b, _, r, c, k in published.convs]
    # The published counts themselves (DESIGN 4b). Which convs need a halo is the census's rule:
    # SDXL has 40 3x3 convs, 39 without conv_in, which reads the input every rank holds whole.
    expected = {"sdxl": (70, 46), "pixart-sigma": (28, 0), "flux1-dev": (19 + 38, 0)}[key]
    assert (len(mine.attn), mine.norms) == expected
    assert len(mine.convs) in ((39, 40) if spec.unet else (0,))
    # ...and only widths are narrower.
    assert all(kv < kv_pub for (_, _, kv, _, _), (_, _, kv_pub, _, _) in zip(mine.attn, published.attn))


@pytest.mark.parametrize("name", LAYOUTS)
def test_module_graph_equals_the_published_model(name, pipes):
    """Every module, by name and class, and every attention processor class, as built from
    the published config on the meta device; the same transformer blocks."""
    denoiser = denoiser_of(pipes[name])
    published = _load_model(MODELS[KEYS[name]])
    assert next(published.parameters()).is_meta

    def graph(model):
        return [(path, type(module).__name__) for path, module in model.named_modules()]

    assert graph(denoiser) == graph(published)
    processors = {k: type(v).__name__ for k, v in denoiser.attn_processors.items()}
    assert processors == {k: type(v).__name__ for k, v in published.attn_processors.items()}
    for blocks in ("transformer_blocks", "single_transformer_blocks"):
        assert len(getattr(denoiser, blocks, ())) == len(getattr(published, blocks, ()))
    if name == "pixart-layout":
        assert len(denoiser.transformer_blocks) == 28
    if name == "flux-layout":
        assert (len(denoiser.transformer_blocks), len(denoiser.single_transformer_blocks)) == (19, 38)
    # Narrow: the published denoisers have 2.6 (SDXL), 0.6 (PixArt-Sigma) and 12 (Flux) billion parameters.
    assert sum(p.numel() for p in denoiser.parameters()) < 3e7


@pytest.mark.parametrize("name", LAYOUTS)
def test_only_widths_differ_from_the_published_config(name, pipes):
    stored = _published_config(name)
    config = denoiser_of(pipes[name]).config
    assert type(denoiser_of(pipes[name])).__name__ == stored["_class_name"]
    for key, value in stored.items():
        if key.startswith("_"):
            continue
        if key in NARROWED[name]:
            published, narrow = NARROWED[name][key]
            assert _plain(published) == _plain(value), key
            assert _plain(config[key]) == _plain(narrow), key
        else:
            assert _plain(config[key]) == _plain(value), key
    assert set(NARROWED[name]) <= set(stored)


@pytest.mark.parametrize("name", LAYOUTS)
def test_builds_are_bit_identical_and_described(name, pipes):
    again = PRESETS[name]()
    for key, module in pipes[name].components.items():
        if isinstance(module, torch.nn.Module):
            a, b = module.state_dict(), again.components[key].state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key
    assert info_from_pipeline(name, pipes[name]) == PRESET_INFO[name] == describe_model(name)
