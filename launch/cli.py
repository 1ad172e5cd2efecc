"""`tessera` command line: generate, stream (launch/stream_cli.py), bench (benchmarks/bench.py),
demo (launch/demo.py), doctor (launch/doctor.py) and save-preset.

    tessera generate --model tiny-sd --prompt "a red circle" --height 512 --width 512 \\
        --strategy patch --nproc 2 --out out.png --report report.json --compare-serial
    tessera stream --model tiny-causal-video --chunks 12 --nproc 3 --out video.gif

`--nproc N` spawns N local ranks; under torchrun the world comes from the environment
(every rank runs the command, rank 0 writes the files).
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_MODEL = "shapes-sd"  # the trained preset shipped in engine/models/weights/
INTERRUPTED_EXIT = 130  # the shell's code for a command ended by SIGINT


def add_launcher_arguments(parser) -> None:
    """--launcher and --address, the same for `generate` and `stream`."""
    parser.add_argument("--launcher", choices=("local", "ray"), default="local",
                        help="local: spawned processes on this machine; ray: Ray actors (one node or a cluster)")
    parser.add_argument("--address", default=None,
                        help="--launcher ray: a running cluster (e.g. HEAD_IP:6379); default RAY_ADDRESS, else a private one")


def check_launcher_arguments(args) -> None:
    from parallel.config import ConfigError

    if args.address is not None and args.launcher != "ray":
        raise ConfigError("--address names a Ray cluster; add --launcher ray")


def add_workflow_arguments(parser) -> None:
    """img2img, inpainting, ControlNet, LoRA and batch options of `generate`."""
    group = parser.add_argument_group("workflows")
    group.add_argument("--image", default=None, help="init image (img2img; with --mask: inpainting)")
    group.add_argument("--mask", default=None, help="inpainting mask: white is repainted, black kept")
    group.add_argument("--strength", type=float, default=None,
                       help="how much of --image is re-noised, (0, 1] (default 0.8; inpainting 1.0)")
    group.add_argument("--controlnet", action="append", default=[],
                       help="ControlNet preset (tiny-controlnet), directory or hub id; repeat for several")
    group.add_argument("--control-image", action="append", default=[], help="one per --controlnet, in order")
    group.add_argument("--control-scale", action="append", type=float, default=[],
                       help="conditioning scale per --controlnet (default 1.0)")
    group.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                       help="LoRA adapter file or directory, with an optional weight; repeat for several")
    group.add_argument("--num-images", type=int, default=1, help="images per prompt (saved as OUT-0, OUT-1 ...)")


def lora_arguments(values) -> list[tuple[str, str, float]]:
    """--lora PATH[:WEIGHT] values as (adapter name, path, weight)."""
    from parallel.config import ConfigError

    loras = []
    for i, value in enumerate(values):
        path, weight = value, 1.0
        head, sep, tail = value.rpartition(":")
        if sep and head:
            try:
                path, weight = head, float(tail)
            except ValueError:
                path = value  # a path with a colon in it
        loras.append((f"lora{i}", path, weight))
    if len({path for _, path, _ in loras}) != len(loras):
        raise ConfigError("the same --lora is given twice")
    return loras


def check_nproc(nproc) -> None:
    from parallel.config import ConfigError

    if nproc is not None and nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")


def _parser() -> argparse.ArgumentParser:
    from parallel.config import GN_MODES, STRATEGIES, ParallelConfig

    parser = argparse.ArgumentParser(prog="tessera", description="Distributed diffusion inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate an image across ranks")
    gen.add_argument("--model", default=DEFAULT_MODEL,
                     help="preset name, local diffusers directory, single-file checkpoint (.safetensors/.ckpt) or hub id")
    gen.add_argument("--config", default=None, metavar="DIR",
                     help="for a single-file checkpoint: a diffusers directory of the same architecture (its configs)")
    gen.add_argument("--prompt", default="a red circle and a blue square on a dark background")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size)")
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--steps", type=int, default=20, help="denoising steps")
    gen.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (<= 1: off)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--scheduler", default=None, help="diffusers scheduler class, e.g. DDIMScheduler")
    gen.add_argument("--strategy", choices=STRATEGIES, default=None,
                     help="default: patch with several ranks, none with one")
    gen.add_argument("--warmup-steps", type=int, default=ParallelConfig.warmup_steps)
    gen.add_argument("--pcpp-portion", type=float, default=ParallelConfig.pcpp_portion,
                     help="pcpp: share of each adjacent band's rows that self-attention sees")
    gen.add_argument("--asg-tile-overlap", type=int, default=None,
                     help="asg: latent rows shared by neighbouring native-size tiles (default: a quarter tile)")
    gen.add_argument("--asg-strength", type=float, default=ParallelConfig.asg_strength,
                     help="asg: structure guidance weight at the noisiest step, 0 to 4 (cosine decay to 0)")
    gen.add_argument("--asg-mask-floor", type=float, default=ParallelConfig.asg_mask_floor,
                     help="asg: the structure mask's floor in [0, 1] (1: guide everywhere alike)")
    gen.add_argument("--asg-detail-steps", type=int, default=None,
                     help="asg: last steps without structure guidance (default: a quarter of the steps)")
    gen.add_argument("--asg-staleness", type=int, default=ParallelConfig.asg_staleness, choices=(0, 1),
                     help="asg: age in steps of the guidance tiles use in a parallel run")
    gen.add_argument("--gn-mode", choices=GN_MODES, default=ParallelConfig.gn_mode)
    gen.add_argument("--bucket-mb", type=float, default=None,
                     help="MB per bucketed phase of a stale step's posts (default: three phases; 0: one "
                          "operation per layer)")
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile the denoiser with the parallel layers (none/patch/patch-sync/pcpp; "
                          "the first compiled step takes long)")
    cfg = gen.add_mutually_exclusive_group()
    cfg.add_argument("--cfg-split", dest="cfg_split", action="store_true", default=None,
                     help="CFG halves on two rank groups (default: on when guided and the world is even)")
    cfg.add_argument("--no-cfg-split", dest="cfg_split", action="store_false")
    gen.add_argument("--nproc", type=int, default=None, help="start N ranks (not under torchrun)")
    add_launcher_arguments(gen)
    gen.add_argument("--device", default=None, help="cpu or cuda (default: the rank's local GPU if any)")
    gen.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    gen.add_argument("--timeout", type=float, default=ParallelConfig.comm_timeout_s, help="seconds any collective may take")
    gen.add_argument("--out", default="outputs/image.png", help=".png, .jpg or .webp")
    gen.add_argument("--report", default=None, help="write the JSON report here (.json)")
    gen.add_argument("--memory-limit-gb", type=float, default=None,
                     help="refuse requests whose estimated memory per rank is above this (default: this machine's "
                          "memory per rank; inf: no bound)")
    gen.add_argument("--compare-serial", action="store_true", help="also run serially and report fidelity")
    gen.add_argument("--no-progress", action="store_true")
    add_workflow_arguments(gen)

    from launch.stream_cli import add_parser as add_stream_parser

    add_stream_parser(sub)
    from launch.demo import add_parser as add_demo_parser

    add_demo_parser(sub)
    from launch.doctor import add_parser as add_doctor_parser

    add_doctor_parser(sub)
    sub.add_parser("bench", add_help=False, help="scaling sweep with peers and plots (tessera bench --help)")

    save = sub.add_parser("save-preset", help="write a built-in preset as a diffusers directory")
    save.add_argument("name")
    save.add_argument("path")
    return parser


def _world(args) -> int:
    from comms.groups import env_world
    from parallel.config import ConfigError

    check_nproc(args.nproc)
    env = env_world()
    if env is not None and env[1] > 1:
        if args.nproc not in (None, env[1]):
            raise ConfigError(f"--nproc {args.nproc} under torchrun with {env[1]} ranks; drop --nproc")
        return env[1]
    return args.nproc or 1


def generate(args) -> int:
    import torch

    from engine import Engine, ParallelConfig
    from engine.api import check_device
    from engine.budget import check_request_memory
    from engine.models import describe_model
    from launch.outputs import IMAGE_FORMATS, REPORT_FORMATS, check_output_path
    from engine.requests import build_request
    from parallel.config import ConfigError
    from parallel.registry import default_strategy

    world = _world(args)
    strategy = args.strategy or default_strategy(world, video=False)
    parallel = ParallelConfig(
        strategy=strategy,
        world_size=world,
        warmup_steps=args.warmup_steps,
        pcpp_portion=args.pcpp_portion,
        asg_tile_overlap=args.asg_tile_overlap,
        asg_strength=args.asg_strength,
        asg_mask_floor=args.asg_mask_floor,
        asg_detail_steps=args.asg_detail_steps,
        asg_staleness=args.asg_staleness,
        gn_mode=args.gn_mode,
        cfg_split=args.cfg_split,
        bucket_mb=args.bucket_mb,
        compile=args.compile,
        comm_timeout_s=args.timeout,
    ).validate()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    request = dict(
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        negative_prompt=args.negative_prompt,
        scheduler=args.scheduler,
        compare_serial=args.compare_serial,
        image=args.image,
        mask_image=args.mask,
        strength=args.strength,
        controlnet=args.controlnet,
        control_image=args.control_image,
        controlnet_conditioning_scale=args.control_scale or 1.0,
        num_images_per_prompt=args.num_images,
    )
    check_output_path(args.out, IMAGE_FORMATS, "--out")
    if args.report:
        check_output_path(args.report, REPORT_FORMATS, "--report")
    loras = lora_arguments(args.lora)
    from engine.models.single_file import model_spec

    model = model_spec(args.model, args.config)
    info = describe_model(model)
    if info is not None:  # bad input fails before any rank starts
        from engine.workflows import check_lora

        for name, path, weight in loras:
            check_lora(name, path, weight, info)
        checked = build_request(info, parallel, args.prompt, **request)
        local = args.launcher == "local"
        device_type = check_device(args.device, world, local_ranks=None if local else 1, cluster=not local)
        check_request_memory(info, checked, world if local else None, device_type, args.memory_limit_gb)
    check_launcher_arguments(args)
    with Engine.from_pretrained(model, parallel=parallel, device=args.device, dtype=dtype,
                                launcher=args.launcher, address=args.address) as engine:
        for name, path, weight in loras:
            engine.load_lora(name, path, weight)
        result = engine.generate(args.prompt, progress=not args.no_progress, memory_limit_gb=args.memory_limit_gb,
                                 **request)
    if not result.images:
        return 0  # a non-zero torchrun rank: rank 0 writes the outputs
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    stem, ext = os.path.splitext(args.out)
    paths = [args.out] if len(result.images) == 1 else [f"{stem}-{i}{ext}" for i in range(len(result.images))]
    for image, path in zip(result.images, paths):
        image.save(path)
        print(f"image: {os.path.abspath(path)}")
    if args.report:
        print(f"report: {os.path.abspath(result.save_report(args.report))}")
    _print_summary(result.report)
    return 0


def _print_summary(report: dict) -> None:
    if "prompt_truncated" in report:
        cut = report["prompt_truncated"]
        print(f"tessera: warning: the prompt has {cut['tokens']} tokens; the text encoder kept the first {cut['kept']}",
              file=sys.stderr)
    print(
        f"{report['strategy']} on {report['world_size']} rank(s), {report['height']}x{report['width']}, "
        f"{report['steps']} steps: {report['latency_s']:.2f} s"
    )
    for r in report["per_rank"]:
        print(
            f"  rank {r['rank']}: compute {r['compute_s']:.2f} s, comm wait {r['comm_wait_s']:.2f} s, "
            f"sent {r['bytes_sent'] / 1e6:.2f} MB, received {r['bytes_received'] / 1e6:.2f} MB, "
            f"{r['collectives']} ops"
        )
    if "vs_serial" in report:
        v = report["vs_serial"]
        print(f"  vs serial: PSNR {v['psnr_db']:.2f} dB, rel L2 {v['rel_l2']:.2e}, max abs err {v['max_abs_err']:.3f}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":  # its own argument parser (benchmarks/bench.py)
        from benchmarks.bench import main as bench_main
        from parallel.config import ConfigError

        try:
            return bench_main(argv[1:])
        except ConfigError as exc:
            print(f"tessera: error: {exc}", file=sys.stderr)
            return 2
    args = _parser().parse_args(argv)
    from launch.worker import RankFailedError, RequestFailedError
    from parallel.config import ConfigError

    try:
        if args.command == "save-preset":
            from engine.models import save_preset

            print(save_preset(args.name, args.path))
            return 0
        if args.command == "stream":
            from launch.stream_cli import stream_command

            return stream_command(args)
        if args.command == "doctor":
            from launch.doctor import doctor_command

            return doctor_command(args)
        if args.command == "demo":
            from launch.demo import demo_command

            return demo_command(args)
        return generate(args)
    except ConfigError as exc:
        print(f"tessera: error: {exc}", file=sys.stderr)
        return 2
    except (RankFailedError, RequestFailedError) as exc:
        print(f"tessera: error: {exc}", file=sys.stderr)
        if exc.details:
            print(exc.details, file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the launcher has already stopped the ranks
        print("tessera: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT


if __name__ == "__main__":
    sys.exit(main())
