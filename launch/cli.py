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


def _parser() -> argparse.ArgumentParser:
    from parallel.config import GN_MODES, STRATEGIES, ParallelConfig

    parser = argparse.ArgumentParser(prog="tessera", description="Distributed diffusion inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate an image across ranks")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="preset name, local diffusers directory or hub id")
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
    gen.add_argument("--out", default="outputs/image.png")
    gen.add_argument("--report", default=None, help="write the JSON report here")
    gen.add_argument("--compare-serial", action="store_true", help="also run serially and report fidelity")
    gen.add_argument("--no-progress", action="store_true")

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

    env = env_world()
    if env is not None and env[1] > 1:
        if args.nproc not in (None, env[1]):
            raise ConfigError(f"--nproc {args.nproc} under torchrun with {env[1]} ranks; drop --nproc")
        return env[1]
    return args.nproc or 1


def generate(args) -> int:
    import torch

    from engine import Engine, ParallelConfig
    from engine.models import describe_model
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
    )
    info = describe_model(args.model)
    if info is not None:
        build_request(info, parallel, args.prompt, **request)  # bad input fails before any rank starts
    check_launcher_arguments(args)
    with Engine.from_pretrained(args.model, parallel=parallel, device=args.device, dtype=dtype,
                                launcher=args.launcher, address=args.address) as engine:
        result = engine.generate(args.prompt, progress=not args.no_progress, **request)
    if not result.images:
        return 0  # a non-zero torchrun rank: rank 0 writes the outputs
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    result.image.save(args.out)
    print(f"image: {os.path.abspath(args.out)}")
    if args.report:
        print(f"report: {os.path.abspath(result.save_report(args.report))}")
    _print_summary(result.report)
    return 0


def _print_summary(report: dict) -> None:
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
    from launch.worker import RankFailedError
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
    except RankFailedError as exc:
        print(f"tessera: error: {exc}", file=sys.stderr)
        if exc.details:
            print(exc.details, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
