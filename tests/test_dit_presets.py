"""The random-weight DiT presets (`tiny-pixart`, `tiny-sd3`, `tiny-flux`): reproducible
builds, ModelInfo that matches the pipelines, offline save/reload, deterministic runs."""

from dataclasses import replace

import pytest
import torch

from engine.latents import spatial_latents
from engine.models import (
    denoiser_of,
    describe_model,
    info_from_pipeline,
    load_pipeline,
    pipeline_call_kwargs,
    save_preset,
)
from engine.models.presets import PRESET_INFO, PRESETS

DITS = ["tiny-pixart", "tiny-sd3", "tiny-flux"]
SIZE = 64  # px: 8x8 latents, the smallest size every DiT preset takes (Flux packs 2x2)


def _modules(pipe) -> dict:
    return {k: m for k, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


def _same_weights(a, b) -> bool:
    ma, mb = _modules(a), _modules(b)
    if ma.keys() != mb.keys():
        return False
    for key in ma:
        sa, sb = ma[key].state_dict(), mb[key].state_dict()
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="module")
def pipes():
    built = {}
    for name in DITS:
        built[name] = PRESETS[name]()
        built[name].set_progress_bar_config(disable=True)
    return built


def _generate(pipe, seed: int, batches: list | None = None) -> torch.Tensor:
    """2 guided steps at SIZE; `batches` collects the denoiser's batch size per call."""
    hook = None
    if batches is not None:
        def record(module, args, kwargs):
            batches.append((args[0] if args else kwargs["hidden_states"]).shape[0])

        hook = denoiser_of(pipe).register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = pipe("a red circle", height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=5.0,
                   generator=torch.Generator().manual_seed(seed), output_type="latent", **pipeline_call_kwargs(pipe))
    finally:
        if hook is not None:
            hook.remove()
    return out.images


@pytest.mark.parametrize("name", DITS)
def test_builds_are_bit_identical(name, pipes):
    assert _same_weights(PRESETS[name](), pipes[name])


@pytest.mark.parametrize("name", DITS)
def test_preset_info_agrees_with_the_built_pipeline(name, pipes):
    pipe, info = pipes[name], PRESET_INFO[name]
    transformer = pipe.transformer
    assert info.pipeline == type(pipe).__name__
    assert info.vae_scale_factor == pipe.vae_scale_factor
    # The pipeline's own default size: default_sample_size (SD3, Flux) or the transformer's.
    default_sample = getattr(pipe, "default_sample_size", None) or transformer.config.sample_size
    assert info.native_size == default_sample * pipe.vae_scale_factor
    # align = latent rows per row of tokens: Flux packs 2x2 latents into a token of 4C channels.
    packed = name == "tiny-flux"
    assert info.align == transformer.config.patch_size * (2 if packed else 1)
    if packed:
        assert transformer.config.in_channels == 4 * pipe.vae.config.latent_channels
    else:
        assert transformer.config.in_channels == pipe.vae.config.latent_channels


@pytest.mark.parametrize("name", DITS)
def test_saved_directory_describes_itself_and_reloads(name, pipes, tmp_path):
    path = save_preset(name, str(tmp_path / name))
    assert describe_model(path) == replace(PRESET_INFO[name], name=path)
    loaded = load_pipeline(path, torch.device("cpu"))
    assert type(loaded) is type(pipes[name])
    assert _same_weights(loaded, pipes[name])


@pytest.mark.parametrize("name", DITS)
def test_runs_deterministically_and_unpacks_to_spatial_latents(name, pipes):
    pipe = pipes[name]
    batches = []
    a = _generate(pipe, seed=0, batches=batches)
    assert torch.equal(a, _generate(pipe, seed=0))
    assert not torch.equal(a, _generate(pipe, seed=1))
    # Guided PixArt/SD3 batch uncond + cond; Flux embeds the guidance scale and never does.
    assert set(batches) == {2 if PRESET_INFO[name].does_cfg else 1}
    x = spatial_latents(pipe, a, SIZE, SIZE)
    assert x.shape == (1, pipe.vae.config.latent_channels, SIZE // 8, SIZE // 8)
    if a.ndim == 3:  # packed (Flux): unpacking inverts the pipeline's own packing
        assert torch.equal(pipe._pack_latents(x, 1, x.shape[1], SIZE // 8, SIZE // 8), a)
    else:
        assert x is a


def test_pixart_call_kwargs_keep_the_requested_size(pipes):
    assert pipeline_call_kwargs(pipes["tiny-pixart"]) == {"use_resolution_binning": False, "clean_caption": False}
    assert pipeline_call_kwargs(pipes["tiny-flux"]) == {}


@pytest.mark.parametrize("name", DITS + ["tiny-sd"])
def test_info_from_a_loaded_pipeline_matches_preset_info(name, pipes):
    pipe = pipes[name] if name in pipes else PRESETS[name]()
    assert denoiser_of(pipe) is (pipe.unet if name == "tiny-sd" else pipe.transformer)
    assert info_from_pipeline(name, pipe) == PRESET_INFO[name]
