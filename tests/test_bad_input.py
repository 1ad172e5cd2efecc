"""Bad input over the CLI and the API: one clear line (exit code 2 on the CLI), before any rank
is spawned. Every case runs in this process; a spawn would show up as a child process."""

import json
import math
import multiprocessing
import os

import pytest

from engine import ConfigError, Engine, ParallelConfig
from engine.models import describe_model
from engine.requests import build_request
from launch.cli import main

TINY = ["--model", "tiny-sd", "--height", "64", "--width", "64", "--steps", "2", "--no-progress"]


@pytest.fixture(autouse=True)
def no_rank_spawned():
    before = {p.pid for p in multiprocessing.active_children()}  # ranks other modules keep alive
    yield
    assert not {p.pid for p in multiprocessing.active_children()} - before, "a rank was spawned"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "afile").write_text("x")
    (root / "adir").mkdir()
    (root / "adir.png").mkdir()
    empty = root / "empty-index"
    empty.mkdir()
    (empty / "model_index.json").write_text("{}")
    missing = root / "missing-part"
    missing.mkdir()
    (missing / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "unet": ["diffusers", "UNet2DConditionModel"]}))
    broken = root / "broken-weights"
    (broken / "unet").mkdir(parents=True)
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                        "unet": ["diffusers", "UNet2DConditionModel"]}))
    (broken / "unet" / "config.json").write_text("{}")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\xff" * 64)
    return root


GENERATE = [
    (["--nproc", "0"], "--nproc must be at least 1"),
    (["--nproc", "-2"], "--nproc must be at least 1"),
    (["--timeout", "nan"], "comm_timeout_s must be a finite number"),
    (["--timeout", "inf"], "comm_timeout_s must be a finite number"),
    (["--timeout", "0.001"], "comm_timeout_s must be a finite number"),
    (["--timeout", "-5"], "comm_timeout_s must be a finite number"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "mps"], "unknown device 'mps'"),
    (["--seed", "18446744073709551616"], "seed must be an integer in 0..2\\*\\*64-1"),
    (["--seed", "-1"], "seed must be an integer in 0..2\\*\\*64-1"),
    (["--scheduler", "SchedulerMixin"], "not a sampler"),
    (["--scheduler", "ScoreSdeVeScheduler"], "not a sampler"),
    (["--scheduler", "DDIMPipeline"], "unknown scheduler"),
    (["--guidance", "nan"], "guidance_scale must be a finite number"),
    (["--guidance", "-1"], "guidance_scale must be a finite number"),
    (["--steps", "0"], "positive integer"),
    (["--height", "100000", "--width", "100000"], "GiB per rank, over the limit"),
    (["--height", "100000", "--width", "128"], "GiB per rank, over the limit"),
    (["--height", "512", "--width", "512", "--memory-limit-gb", "0.001"], "over the limit of 0.0 GiB \\(memory_limit_gb\\)"),
    (["--memory-limit-gb", "0"], "memory_limit_gb must be a positive number"),
    (["--nproc", "2", "--strategy", "pcpp", "--pcpp-portion", "nan"], "pcpp_portion must be a number"),
    (["--nproc", "2", "--bucket-mb", "nan"], "bucket_mb must be None"),
    (["--nproc", "2", "--bucket-mb", "-1"], "bucket_mb must be None"),
    (["--strategy", "asg", "--asg-strength", "9"], "asg_strength must be a number in"),
    (["--warmup-steps", "-1"], "warmup_steps must be a non-negative integer"),
    (["--out", "{tmp}/x.xyz"], "unknown format .xyz"),
    (["--out", "{tmp}/noext"], "unknown format \\(no extension\\)"),
    (["--out", "{tmp}/adir.png"], "is a directory"),
    (["--out", "{tmp}/afile/x.png"], "is a file, not a directory"),
    (["--out", "{tmp}/afile/deeper/x.png"], "is a file, not a directory"),
    (["--report", "{tmp}/r.txt"], "--report .*unknown format .txt"),
    (["--report", "{tmp}/afile/r.json"], "--report .*is a file, not a directory"),
    (["--model", "{tmp}/empty-index"], "model_index.json: no _class_name"),
    (["--model", "{tmp}/missing-part"], "missing-part/unet: missing"),
    (["--model", "{tmp}/broken-weights"], "diffusion_pytorch_model.safetensors: not a safetensors file"),
    (["--model", "{tmp}/adir"], "not a diffusers pipeline \\(no model_index.json\\)"),
    (["--model", "no-such-model"], "tiny-causal-video"),  # every preset is listed
    (["--model", "tiny-causal-video"], "streaming video model"),
    (["--nproc", "2", "--launcher", "local", "--address", "1.2.3.4:6379"], "needs --launcher ray|add --launcher ray"),
]


@pytest.mark.parametrize("argv,message", GENERATE, ids=[" ".join(a) for a, _ in GENERATE])
def test_generate_refuses_bad_input_with_one_line(argv, message, files, capsys):
    argv = [a.replace("{tmp}", str(files)) for a in argv]
    out = ["--out", str(files / "never.png")] if "--out" not in argv else []
    assert main(["generate", *TINY, *out, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tessera: error:") and len(err.splitlines()) == 1, err
    assert __import__("re").search(message, err), err
    assert not (files / "never.png").exists()


STREAM = [
    (["--chunks", "0"], "num_chunks must be a positive integer"),
    (["--nproc", "0"], "--nproc must be at least 1"),
    (["--out", "{tmp}/video.avi"], "unknown format .avi"),
    (["--out", "{tmp}/afile"], "is a file"),
    (["--report", "{tmp}/afile/r.json"], "is a file, not a directory"),
    (["--model", "tiny-sd"], "not a causal video model"),
    (["--endless", "--compare-serial"], "needs a finite stream"),
]


@pytest.mark.parametrize("argv,message", STREAM, ids=[" ".join(a) for a, _ in STREAM])
def test_stream_refuses_bad_input_with_one_line_before_loading(argv, message, files, capsys):
    argv = [a.replace("{tmp}", str(files)) for a in argv]
    assert main(["stream", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tessera: error:") and len(err.splitlines()) == 1, err
    assert message in err, err


CONFIGS = [
    (dict(comm_timeout_s="10"), "comm_timeout_s must be a finite number"),
    (dict(comm_timeout_s=math.nan), "comm_timeout_s must be a finite number"),
    (dict(threads_per_rank="2"), "threads_per_rank must be None or a positive integer"),
    (dict(threads_per_rank=1.5), "threads_per_rank must be None or a positive integer"),
    (dict(threads_per_rank=0), "threads_per_rank must be None or a positive integer"),
    (dict(world_size=True), "world_size must be a positive integer"),
    (dict(world_size=2.0), "world_size must be a positive integer"),
    (dict(warmup_steps=True), "warmup_steps must be a non-negative integer"),
    (dict(trace_comms="yes"), "trace_comms must be True or False"),
    (dict(asg_strength=math.nan), "asg_strength must be a number"),
]


@pytest.mark.parametrize("fields,message", CONFIGS, ids=[str(f) for f, _ in CONFIGS])
def test_parallel_config_refuses_bad_fields(fields, message):
    with pytest.raises(ConfigError, match=message):
        ParallelConfig(**fields).validate()
    with pytest.raises(ConfigError, match=message):  # through the API: before any rank starts
        Engine.from_pretrained("tiny-sd", parallel=ParallelConfig(**{"world_size": 2, **fields}))


def test_api_refuses_bad_engine_arguments():
    with pytest.raises(ConfigError, match="auto_restart must be True or False"):
        Engine.from_pretrained("tiny-sd", parallel=ParallelConfig(world_size=2), auto_restart="yes")
    with pytest.raises(ConfigError, match="unknown device"):
        Engine.from_pretrained("tiny-sd", parallel=ParallelConfig(world_size=2), device="tpu")
    with pytest.raises(ConfigError, match="tiny-causal-video"):
        Engine.from_pretrained("nope", parallel=ParallelConfig(world_size=2))


def test_warmup_covering_every_step_warns_that_the_run_is_exact():
    config = ParallelConfig(strategy="patch", world_size=2, warmup_steps=4)
    with pytest.warns(UserWarning, match="every exchange is fresh") as caught:
        request = build_request(describe_model("tiny-sd"), config, "x", height=128, width=128, num_inference_steps=4)
    assert request.parallel.strategy == "patch"  # a warning, not a refusal: the run goes ahead, exactly
    assert sum("every exchange is fresh" in str(w.message) for w in caught) == 1


def test_a_request_cannot_change_what_the_engine_fixed(pool):
    engine = pool.serial_engine("tiny-sd")
    for fields in (dict(comm_timeout_s=10.0), dict(threads_per_rank=2), dict(world_size=2)):
        with pytest.raises(ConfigError, match="a request cannot change"):
            engine.generate("x", height=64, width=64, num_inference_steps=1, progress=False,
                            parallel=ParallelConfig(strategy="none", **fields))


def test_an_over_long_prompt_is_reported_as_truncated(pool):
    report = pool.serial_engine("tiny-sd").generate("red " * 200, height=64, width=64, num_inference_steps=1,
                                                    progress=False).report
    assert report["prompt_truncated"]["tokens"] > report["prompt_truncated"]["kept"] == 77
