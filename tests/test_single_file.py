"""LDM single-file export (engine.models.ldm_format): diffusers' own `from_single_file` reads
every component of the written file back bit for bit, from a config directory stripped of
weights, and the file's keys are those of a real checkpoint (diffusers' detector agrees)."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from engine.models.ldm_format import ldm_state_dict, save_single_file
from engine.models.presets import PRESETS
from engine.models.tiny_parts import PRESET_SEED, clip_config


def sd15_shaped():
    """tiny-sd with SD 1.5's UNet graph (4 levels, 2 resnets per level, no attention at the
    bottom) at narrow widths: block indices that differ from the presets' 1-per-level ones."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = PRESETS["tiny-sd"]()
    torch.manual_seed(PRESET_SEED)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(16, 32, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
    )
    return StableDiffusionPipeline(**{**pipe.components, "unet": unet})


def open_clip_encoder(hidden: int = 48, layers: int = 10):
    """A second text encoder diffusers can tell from tiny CLIP-L (width 32), with the 10
    layers its SDXL detector looks for (resblocks.9)."""
    from transformers import CLIPTextModelWithProjection

    config = clip_config(514, hidden=hidden, projection_dim=32)
    config.num_hidden_layers = layers
    torch.manual_seed(PRESET_SEED + 1)
    return CLIPTextModelWithProjection(config)


def sdxl_layout_wide():
    """sdxl-layout (SDXL base's UNet graph) with a wider OpenCLIP encoder. Only weights are
    compared, so the UNet's cross-attention width need not fit it."""
    from diffusers import StableDiffusionXLPipeline

    pipe = PRESETS["sdxl-layout"]()
    return StableDiffusionXLPipeline(**{**pipe.components, "text_encoder_2": open_clip_encoder()})


def tiny_sdxl_refiner():
    """The refiner's frame: no first text encoder, OpenCLIP alone."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = PRESETS["tiny-sdxl"]()
    parts = {**pipe.components, "text_encoder": None, "tokenizer": None, "text_encoder_2": open_clip_encoder()}
    return StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=True)


CASES = {
    "tiny-sd": PRESETS["tiny-sd"],
    "tiny-sdxl": PRESETS["tiny-sdxl"],
    "sd15-shaped": sd15_shaped,
    "sdxl-layout-wide": sdxl_layout_wide,
    "tiny-sdxl-refiner": tiny_sdxl_refiner,
}
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")

# diffusers matches the SDXL file's CLIP-L to a text encoder by position-embedding width
# before it looks for OpenCLIP: tiny-sdxl's encoders are both 32 wide, so text_encoder_2 is
# given CLIP-L's weights (and keeps no text_projection). A diffusers limitation, not the file's:
# sdxl-layout-wide (OpenCLIP 48 wide) round-trips.
SAME_WIDTH_TRAP = pytest.mark.xfail(
    strict=True, reason="diffusers loads CLIP-L's weights into text_encoder_2 when both are as wide")


def round_trip_params():
    params = []
    for case in CASES:
        for component in COMPONENTS:
            marks = [SAME_WIDTH_TRAP] if (case, component) == ("tiny-sdxl", "text_encoder_2") else []
            params.append(pytest.param(case, component, marks=marks, id=f"{case}-{component}"))
    return params


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """case -> (the pipeline, the pipeline diffusers loads from its single file), built once."""
    import diffusers

    done = {}

    def load(case):
        if case not in done:
            pipe = CASES[case]()
            root = tmp_path_factory.mktemp(case)
            config_dir = str(root / "config")
            pipe.save_pretrained(config_dir)
            weights = glob.glob(f"{config_dir}/**/*.safetensors", recursive=True)
            weights += glob.glob(f"{config_dir}/**/*.bin", recursive=True)
            assert weights
            for path in weights:  # configs and tokenizers only: every weight must come from the file
                os.remove(path)
            path = save_single_file(pipe, str(root / "model.safetensors"))
            cls = getattr(diffusers, type(pipe).__name__)
            done[case] = pipe, cls.from_single_file(path, config=config_dir, local_files_only=True)
        return done[case]

    return load


def mismatches(original: torch.nn.Module, loaded: torch.nn.Module) -> list[str]:
    """Keys missing on either side, left on the meta device (never loaded), or not equal."""
    want, got = original.state_dict(), loaded.state_dict()
    bad = sorted(set(want) ^ set(got))
    for key in sorted(set(want) & set(got)):
        if got[key].device.type == "meta" or not torch.equal(want[key], got[key]):
            bad.append(key)
    return bad


@pytest.mark.parametrize("case,component", round_trip_params())
def test_round_trip(round_trip, case, component):
    pipe, back = round_trip(case)
    original = getattr(pipe, component, None)
    if original is None:
        assert getattr(back, component, None) is None
        return
    assert type(getattr(back, component)) is type(original)
    assert mismatches(original, getattr(back, component)) == []


def test_same_width_trap_is_diffusers_choice(round_trip):
    """What the xfail above is: tiny-sdxl's text_encoder_2 came back holding CLIP-L's
    weights, though the file holds its own OpenCLIP ones."""
    pipe, back = round_trip("tiny-sdxl")
    key = "encoder.layers.0.self_attn.q_proj.weight"
    loaded = back.text_encoder_2.state_dict()[f"text_model.{key}"]
    assert torch.equal(loaded, pipe.text_encoder.state_dict()[key])
    assert not torch.equal(loaded, pipe.text_encoder_2.state_dict()[f"text_model.{key}"])


def test_keys_are_a_real_checkpoints():
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.",
                "conditioner.embedders.0.", "conditioner.embedders.1.model.")
    files = {case: ldm_state_dict(CASES[case]()) for case in ("sd15-shaped", "sdxl-layout-wide", "tiny-sdxl-refiner")}
    for weights in files.values():
        assert all(key.startswith(prefixes) for key in weights)
        assert "model.diffusion_model.input_blocks.0.0.weight" in weights
        assert "first_stage_model.decoder.conv_in.weight" in weights
        assert weights["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # a 1x1 conv

    # What diffusers' detector (used when no config is given) makes of them.
    assert infer_diffusers_model_type(files["sd15-shaped"]) == "v1"
    assert infer_diffusers_model_type(files["sdxl-layout-wide"]) == "xl_base"
    assert infer_diffusers_model_type(files["tiny-sdxl-refiner"]) == "xl_refiner"

    sd15 = files["sd15-shaped"]
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in sd15
    assert "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight" in sd15
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in sd15  # upsampler after a block without attention

    # SDXL base's own downsampler / upsampler / deepest-attention names.
    xl = files["sdxl-layout-wide"]
    for key in ("input_blocks.3.0.op.weight", "input_blocks.6.0.op.weight", "output_blocks.2.2.conv.weight",
                "output_blocks.5.2.conv.weight", "middle_block.1.transformer_blocks.9.attn1.to_q.weight",
                "label_emb.0.0.weight"):
        assert "model.diffusion_model." + key in xl
    assert "model.diffusion_model.input_blocks.9.0.in_layers.0.weight" not in xl
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in xl
    open_clip = "conditioner.embedders.1.model."
    assert xl[open_clip + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 48, 48)
    assert xl[open_clip + "text_projection"].shape == (48, 32)  # (width, projection): transposed
    assert xl[open_clip + "positional_embedding"].shape == (77, 48)


def test_refuses_other_pipelines_and_file_types(tmp_path):
    class FluxPipeline:
        pass

    with pytest.raises(ValueError, match="FluxPipeline: no LDM single-file layout"):
        ldm_state_dict(FluxPipeline())
    with pytest.raises(ValueError, match="must end in .safetensors"):
        save_single_file(FluxPipeline(), str(tmp_path / "model.ckpt"))  # checked before anything is built


# -- the engine on single-file checkpoints -------------------------------------------------

def tiny_sdxl_wide():
    """tiny-sdxl with a 48-wide OpenCLIP encoder (diffusers tells the two encoders apart by
    width) and a UNet whose cross-attention takes both (32 + 48)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    pipe = PRESETS["tiny-sdxl"]()
    torch.manual_seed(PRESET_SEED + 2)
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "cross_attention_dim": 32 + 48})
    return StableDiffusionXLPipeline(**{**pipe.components, "unet": unet, "text_encoder_2": open_clip_encoder(layers=2)})


ENGINE_CASES = {"tiny-sd": PRESETS["tiny-sd"], "tiny-sdxl-wide": tiny_sdxl_wide, "tiny-sdxl": PRESETS["tiny-sdxl"]}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """case -> (a diffusers directory with weights, the same without weights, the single file)."""
    import shutil

    done = {}

    def write(case):
        if case not in done:
            pipe = ENGINE_CASES[case]()
            root = tmp_path_factory.mktemp(f"engine-{case}")
            full, config = str(root / "full"), str(root / "config")
            pipe.save_pretrained(full)
            shutil.copytree(full, config, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
            done[case] = full, config, save_single_file(pipe, str(root / f"{case}.safetensors"))
        return done[case]

    return write


@pytest.mark.parametrize("case", ["tiny-sdxl-wide"])  # SD 1.x: the .ckpt and CLI tests below
def test_the_engine_runs_a_single_file_checkpoint_exactly(checkpoint, case):
    """Each rank converts the file with the config directory's configs; patch-sync on 2 ranks
    equals serial, and equals the same weights loaded from a diffusers directory."""
    import numpy as np

    from engine import Engine, ParallelConfig
    from engine.metrics import rel_l2

    full, config, path = checkpoint(case)
    kwargs = dict(height=64, width=64, num_inference_steps=3, seed=2, progress=False)
    with Engine.from_pretrained(path, config=config, parallel=ParallelConfig(strategy="patch", world_size=2)) as engine:
        assert engine.model == path
        result = engine.generate("a red circle", parallel=ParallelConfig(strategy="patch-sync", cfg_split=False),
                                 compare_serial=True, **kwargs)
    assert result.report["vs_serial"]["latent_rel_l2"] <= 1e-5
    with Engine.from_pretrained(full) as serial:  # one rank, from the diffusers directory
        same = serial.generate("a red circle", **kwargs)
    assert rel_l2(result.latents.numpy(), same.latents.numpy()) <= 1e-5
    assert np.isfinite(result.latents.numpy()).all()


def test_a_file_diffusers_cannot_fully_convert_is_refused(checkpoint):
    """tiny-sdxl's two text encoders are equally wide: diffusers fills the second with the
    first's weights and leaves its projection empty; the engine says so instead of running."""
    from engine import ConfigError
    from engine.models.single_file import SingleFile, load_single_file

    _, config, path = checkpoint("tiny-sdxl")
    with pytest.raises(ConfigError, match=r"no weights for text_encoder_2\.text_projection\.weight"):
        load_single_file(SingleFile(path, config), torch.float32)


def test_bad_single_file_requests_fail_before_any_rank_starts(checkpoint, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from engine import ConfigError, Engine

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, config, path = checkpoint("tiny-sd")
    lora = str(tmp_path / "lora.safetensors")
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 2)}, lora)
    _, sdxl_config, sdxl_path = checkpoint("tiny-sdxl-wide")
    not_torch = tmp_path / "notes.ckpt"
    not_torch.write_text("not a checkpoint")
    cases = [
        (dict(model=str(tmp_path / "missing.safetensors"), config=config), "no such checkpoint file"),
        (dict(model=path, config=sdxl_config), "is a StableDiffusionXLPipeline, but its text encoders are a "
                                               "StableDiffusionPipeline's"),
        (dict(model=sdxl_path, config=config), "is a StableDiffusionPipeline, but its text encoders are a "
                                               "StableDiffusionXLPipeline's"),
        (dict(model=str(not_torch), config=config), "not a readable checkpoint"),
        (dict(model=lora, config=config), r"not an SD 1\.x / SDXL single-file checkpoint \(a LoRA\?"),
        (dict(model=path), "a single-file checkpoint needs config=.*diffusers would fetch stable-diffusion-v1-5"),
        (dict(model=path, config=str(tmp_path)), "not a diffusers directory"),
        (dict(model=path, config="someone/configs"), "HF_HUB_OFFLINE is set"),
        (dict(model="tiny-sd", config=config), "config= names the configs of a single-file checkpoint"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            Engine.from_pretrained(**kwargs)


def test_a_ckpt_file_loads_like_the_safetensors_one(checkpoint, tmp_path):
    """The original training code's format: a zip-format torch file with the weights under
    "state_dict"; checked on the caller without loading its weights, converted alike."""
    from engine.models.single_file import SingleFile, check_single_file, load_single_file
    from safetensors.torch import load_file

    full, config, path = checkpoint("tiny-sd")
    ckpt = str(tmp_path / "tiny-sd.ckpt")
    torch.save({"state_dict": load_file(path)}, ckpt)
    spec = check_single_file(SingleFile(ckpt, config))
    from_ckpt = load_single_file(spec, torch.float32)
    from_safetensors = load_single_file(SingleFile(path, config), torch.float32)
    for name in ("unet", "vae", "text_encoder"):
        assert mismatches(getattr(from_safetensors, name), getattr(from_ckpt, name)) == []
    lora = str(tmp_path / "lora.ckpt")
    torch.save({"lora_unet_down.weight": torch.zeros(2)}, lora)
    from engine import ConfigError

    with pytest.raises(ConfigError, match="not an SD 1.x / SDXL single-file checkpoint"):
        check_single_file(SingleFile(lora, config))


def test_the_cli_takes_a_single_file_and_its_config(checkpoint, tmp_path, capsys):
    from launch.cli import main

    _, config, path = checkpoint("tiny-sd")
    out = tmp_path / "out.png"
    assert main(["generate", "--model", path, "--config", config, "--height", "64", "--width", "64", "--steps", "2",
                 "--no-progress", "--out", str(out)]) in (0, None)
    assert out.exists()
    capsys.readouterr()
    assert main(["generate", "--model", "tiny-sd", "--config", config, "--out", str(tmp_path / "never.png")]) == 2
    err = capsys.readouterr().err
    assert "config= names the configs of a single-file checkpoint" in err and len(err.strip().splitlines()) == 1
