"""`tessera stream`: stream video from a causal video model to a file, with live FPS.

    tessera stream --model tiny-causal-video --chunks 12 --nproc 3 --out video.gif \\
        --report stream.json --compare-serial

`--out`: a `.gif` (Pillow), a `.mp4` (needs imageio with ffmpeg), or a folder of PNG frames.
`--compare-serial` replays the same stream on one rank in this process afterwards and adds
`vs_serial` (PSNR and relative L2 over all frames, and the serial run's throughput).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from launch.outputs import REPORT_FORMATS, VIDEO_FORMATS, check_output_path
from launch.cli import INTERRUPTED_EXIT, add_launcher_arguments, check_launcher_arguments, check_nproc

DEFAULT_VIDEO_MODEL = "tiny-causal-video"


def add_parser(sub) -> None:
    st = sub.add_parser("stream", help="stream video from a causal video model (strategy tpp)")
    st.add_argument("--model", default=DEFAULT_VIDEO_MODEL, help="video preset or a local video model directory")
    st.add_argument("--prompt", default="a red ball bouncing on a blue floor")
    st.add_argument("--chunks", type=int, default=8, help="chunks to stream (0 is an error; see --endless)")
    st.add_argument("--endless", action="store_true", help="stream until interrupted (Ctrl-C)")
    st.add_argument("--steps", type=int, default=None, help="denoising steps per chunk (default: the model's)")
    st.add_argument("--height", type=int, default=None)
    st.add_argument("--width", type=int, default=None)
    st.add_argument("--kv-window", type=int, default=None, help="chunks kept in each cache besides the sink")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--nproc", type=int, default=None, help="ranks (tpp when > 1; default: torchrun's world or 1)")
    add_launcher_arguments(st)
    st.add_argument("--device", default=None)
    st.add_argument("--fps", type=float, default=8.0, help="playback rate written into the video file")
    st.add_argument("--out", default="outputs/stream.gif", help=".gif, .mp4 or a folder for PNG frames")
    st.add_argument("--report", default=None, help="write the stream report as JSON")
    st.add_argument("--compare-serial", action="store_true", help="add vs_serial: the same stream on one rank")
    st.add_argument("--no-progress", action="store_true")


class FrameWriter:
    """Writes frames as they arrive; checked before the stream starts."""

    def __init__(self, path: str, fps: float):
        self.path, self.fps = path, fps
        self.kind = "mp4" if path.endswith(".mp4") else "gif" if path.endswith(".gif") else "png"
        if self.kind == "mp4":
            try:
                import imageio  # noqa: F401
            except ImportError as exc:
                from parallel.config import ConfigError

                raise ConfigError("--out .mp4 needs imageio with ffmpeg (not installed); use a .gif or a folder "
                                  "for PNG frames") from exc
        self.frames: list = []
        self.count = 0
        if self.kind == "png":
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def add(self, frame: np.ndarray) -> None:
        if self.kind == "png":
            from PIL import Image

            Image.fromarray(frame).save(os.path.join(self.path, f"frame_{self.count:06d}.png"))
        else:
            self.frames.append(frame)
        self.count += 1

    def close(self) -> None:
        if self.kind == "gif" and self.frames:
            from PIL import Image

            images = [Image.fromarray(f) for f in self.frames]
            images[0].save(self.path, save_all=True, append_images=images[1:], duration=int(1000 / self.fps), loop=0)
        elif self.kind == "mp4" and self.frames:
            import imageio

            imageio.mimwrite(self.path, self.frames, fps=self.fps)


def compare_frames(frames: np.ndarray, reference: np.ndarray) -> dict:
    """PSNR, relative L2 and max abs error over all frames (uint8 in, [0, 1] scale)."""
    from engine.metrics import compare

    if frames.shape != reference.shape:
        raise RuntimeError(f"the serial stream has frames {reference.shape}, this one {frames.shape}")
    return compare(frames, reference)


def stream_command(args) -> int:
    from dataclasses import replace

    from engine import Engine, ParallelConfig
    from engine.results import json_safe
    from parallel.config import ConfigError
    from parallel.registry import default_strategy

    if args.endless and args.compare_serial:
        raise ConfigError("--compare-serial needs a finite stream (--chunks N), not --endless")
    if args.compare_serial and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--compare-serial runs the one-rank stream in this process; use --nproc, not torchrun")
    check_launcher_arguments(args)
    check_nproc(args.nproc)
    if not args.endless and args.chunks < 1:  # before the model is built to validate the rest
        raise ConfigError(f"num_chunks must be a positive integer (or --endless), got {args.chunks}")
    chunks = None if args.endless else args.chunks
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun every rank runs this command
    world = args.nproc or (launched if launched > 1 else None)
    parallel = ParallelConfig(strategy=default_strategy(world or 1, video=True), world_size=world).validate()
    request = dict(num_chunks=chunks, steps=args.steps, seed=args.seed, height=args.height, width=args.width,
                   kv_window=args.kv_window)
    from engine.models import check_model_spec
    from engine.runtime.video import build_stream_request, describe_video
    from engine.models.video import is_video_model

    check_model_spec(args.model)
    if not is_video_model(args.model):
        raise ConfigError(f"{args.model} is not a causal video model; tessera stream needs one (e.g. tiny-causal-video)")
    # bad input fails here, before any rank starts
    check_output_path(args.out, VIDEO_FORMATS, "--out", folder=True)
    if args.report:
        check_output_path(args.report, REPORT_FORMATS, "--report")
    build_stream_request(describe_video(args.model), parallel.strategy, parallel.world_size or 1, args.prompt,
                         **request)
    writer = FrameWriter(args.out, args.fps)
    kept = [] if args.compare_serial else None
    interrupted = False
    try:
        with Engine.from_pretrained(args.model, parallel=parallel, device=args.device, launcher=args.launcher,
                                    address=args.address) as engine:
            stream = engine.stream(args.prompt, progress=not args.no_progress, **request)
            try:
                for frame in stream:
                    writer.add(frame)
                    if kept is not None:
                        kept.append(frame)
            except KeyboardInterrupt:
                interrupted = True  # the ranks ignore SIGINT: close() stops them through the launcher
            finally:
                stream.close()
            report = stream.report
    finally:
        writer.close()  # what was streamed is kept, whatever ended the stream
    done = INTERRUPTED_EXIT if interrupted else 0
    if interrupted:
        print("tessera: interrupted", file=sys.stderr)
    if report is None:
        return done
    if kept is not None and interrupted:
        print("interrupted: no comparison with the serial stream", file=sys.stderr)
    elif kept is not None:
        with Engine.from_pretrained(args.model, parallel=replace(parallel, strategy=default_strategy(1, video=True),
                                                                 world_size=1),
                                    device=args.device) as serial:
            ref_stream = serial.stream(args.prompt, **request)
            reference = np.stack(list(ref_stream))
        vs = compare_frames(np.stack(kept), reference)
        ser = ref_stream.report
        vs.update(serial_steady_fps=ser["steady_fps"], serial_time_to_first_frame_s=ser["time_to_first_frame_s"],
                  serial_stage_bound_fps=ser["stage_bound_fps"])
        report["vs_serial"] = vs
    if report["frames"] == 0 and not kept:
        return done  # a torchrun rank that does not decode
    print(f"video: {os.path.abspath(args.out)} ({writer.count} frames)")
    if args.report:
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
        with open(args.report, "w") as f:
            json.dump(json_safe(report), f, indent=2)
        print(f"report: {os.path.abspath(args.report)}")
    print_stream_summary(report)
    return done


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_stream_summary(report: dict) -> None:
    print(f"{report['strategy']} on {report['world_size']} rank(s), {report['chunks']} chunks, {report['frames']} "
          f"frames {report['height']}x{report['width']}, {report['steps']} steps/chunk: first frame "
          f"{_fmt(report['time_to_first_frame_s'], '.3f')} s, steady {_fmt(report['steady_fps'], '.2f')} fps, "
          f"stage-bound {_fmt(report['stage_bound_fps'], '.2f')} fps")
    for r in report["per_rank"]:
        role = f"steps {r['steps']}" if r["steps"] else "decode"
        print(f"  rank {r['rank']} ({role}): busy {r['busy_fraction']:.0%}, wait {r['wait_fraction']:.0%}, "
              f"sent {r['bytes_sent'] / 1e6:.2f} MB, received {r['bytes_received'] / 1e6:.2f} MB")
    if "vs_serial" in report:
        v = report["vs_serial"]
        print(f"  vs serial: PSNR {_fmt(v.get('psnr_db'), '.2f')} dB, rel L2 {_fmt(v.get('rel_l2'), '.2e')}; "
              f"serial steady {_fmt(v.get('serial_steady_fps'), '.2f')} fps, first frame "
              f"{_fmt(v.get('serial_time_to_first_frame_s'), '.3f')} s")
