"""Bad input fails before any rank starts, with one clear line; a failing rank stops the rest."""

import os
import subprocess
import sys
import time

import pytest

from engine import ConfigError, Engine, ParallelConfig
from engine.models import describe_model
from engine.requests import build_request
from launch.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _req(world=2, strategy="patch", cfg_split=None, pcpp_portion=0.3, model="tiny-sd", **kw):
    args = dict(prompt="x", height=256, width=256, num_inference_steps=4, guidance_scale=5.0, seed=0)
    args.update(kw)
    config = ParallelConfig(strategy=strategy, world_size=world, cfg_split=cfg_split, pcpp_portion=pcpp_portion)
    return build_request(describe_model(model), config, **args)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(height=250), "not a multiple of 8"),
        (dict(width=264), "not a multiple of 32"),  # patch needs VAE x UNet alignment
        (dict(world=9, cfg_split=False), "only 8 bands"),
        (dict(world=3, cfg_split=True), "even world size"),
        (dict(cfg_split=True, guidance_scale=1.0), "needs classifier-free guidance"),
        (dict(num_inference_steps=-3), "positive integer"),
        (dict(num_inference_steps=0), "positive integer"),
        (dict(strategy="stale-magic"), "unknown strategy"),
        (dict(seed=-1), "generator.s range"),
        (dict(seed=2**64), "generator.s range"),
        (dict(negative_prompt="blurry", guidance_scale=1.0), "ignored"),
        (dict(scheduler="NotAScheduler"), "unknown scheduler"),
        (dict(strategy="none"), "runs on one rank"),
        (dict(world=3, cfg_split=1), "True, False or None"),
        (dict(strategy="pcpp", pcpp_portion=0.0), "pcpp_portion must be a number in"),
        (dict(strategy="pcpp", pcpp_portion=1.5), "pcpp_portion must be a number in"),
        (dict(strategy="pcpp", width=264), "not a multiple of 32"),
        (dict(model="tiny-pixart", height=136), "not a multiple of 16"),  # whole rows of 2x2 patches
        (dict(model="tiny-flux", cfg_split=True), "needs classifier-free guidance"),  # guidance is embedded
        (dict(model="tiny-sd3", world=17, cfg_split=False), "only 16 bands"),
    ],
)
def test_bad_request_is_rejected_with_a_clear_message(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        _req(**kwargs)


def test_cfg_split_defaults_on_for_even_guided_worlds_only():
    assert _req(world=4).cfg_split is True
    assert _req(world=3).cfg_split is False
    assert _req(world=4, guidance_scale=1.0).cfg_split is False


def test_unknown_model_is_rejected_before_any_rank_starts():
    start = time.monotonic()
    with pytest.raises(ConfigError, match="unknown model"):
        Engine.from_pretrained("no-such-model", parallel=ParallelConfig(world_size=2))
    assert time.monotonic() - start < 5


def test_unknown_launcher_or_stray_address_is_rejected():
    with pytest.raises(ConfigError, match="unknown launcher"):
        Engine.from_pretrained("tiny-sd", parallel=ParallelConfig(world_size=2), launcher="slurm")
    with pytest.raises(ConfigError, match="needs launcher='ray'"):
        Engine.from_pretrained("tiny-sd", parallel=ParallelConfig(world_size=2), address="127.0.0.1:6379")


def test_preset_description_matches_the_built_model(pool):
    for model in ("tiny-sd", "tiny-sdxl", "tiny-pixart", "tiny-sd3", "tiny-flux"):
        assert pool.serial_engine(model).info == describe_model(model)


@pytest.mark.parametrize(
    "argv",
    [
        ["--height", "250"],
        ["--nproc", "99", "--height", "128", "--width", "128"],
        ["--model", "nope"],
        ["--nproc", "2", "--cfg-split", "--guidance", "1"],
        ["--steps", "-1"],
        ["--nproc", "2", "--strategy", "pcpp", "--pcpp-portion", "0"],
        ["--nproc", "2", "--address", "127.0.0.1:6379"],  # a Ray address without --launcher ray
        ["--nproc", "3", "--strategy", "asg", "--height", "256", "--width", "256", "--model", "tiny-sd"],  # 1 tile, 2 tile ranks
        ["--strategy", "asg", "--height", "128", "--width", "256", "--model", "tiny-sd"],  # below native
    ],
)
def test_cli_bad_input_exits_nonzero_with_one_line(argv, capsys):
    assert main(["generate", *argv, "--out", "/tmp/never.png"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tessera: error:") and len(err.splitlines()) == 1
    assert not os.path.exists("/tmp/never.png")


def test_cli_unknown_strategy_exits_nonzero():
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "generate", "--strategy", "bogus"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        Engine.from_pretrained("tiny-sd", device="cuda", parallel=ParallelConfig(world_size=2))
