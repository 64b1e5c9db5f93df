"""``python -m glmtts.emulator --port P``: run a stand-in GLM-TTS api_server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from glmtts.emulator.app import Emulator, EmulatorOptions
from glmtts.emulator.engine import Engine
from glmtts.emulator.faults import Faults, FaultSpecError
from glmtts.emulator.gpu import GpuCurve, GpuCurveError, GpuShare, default_state_dir, gpu_id_from
from glmtts.emulator.prompts import PromptStore
from glmtts.emulator.synthetic import SyntheticEngine
from glmtts.emulator.timing import MEASURED_THROUGHPUT, ServiceModel
from glmtts.emulator.upstream import UpstreamConfig
from glmtts.loop import new_event_loop

UVICORN_KEEPALIVE_S = 5.0  # uvicorn's --timeout-keep-alive default: idle connections close after 5 s


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _curve(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("throughput values must be > 0")
    return values


def _gpu_curve(text: str) -> GpuCurve:
    try:
        return GpuCurve.parse(text)
    except GpuCurveError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m glmtts.emulator",
        description="A stand-in for GLM-TTS's api_server: the same HTTP API, emulated inference.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8049)
    p.add_argument("--engine", choices=("synthetic", "torch"), default="synthetic",
                   help="synthetic: calibrated timing; torch: real decoding with a random-weight Llama")
    p.add_argument("--time-scale", type=_positive, default=1.0,
                   help="multiply every emulated duration (1 = GPU-like: short ~3.5 s, long ~80 s)")
    p.add_argument("--prompt-cache", type=Path, default=None,
                   help="prompt cache JSON, read at start and rewritten on change "
                        "(default: the packaged examples, in memory)")
    p.add_argument("--seed", type=int, default=0, help="seed of the service-time jitter")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--max-body-mb", type=_positive, default=1024.0)
    timing = p.add_argument_group("synthetic timing")
    timing.add_argument("--load-seconds", type=_non_negative, default=ServiceModel.load_s,
                        help="model (re)load time before time scaling")
    timing.add_argument("--cold-factor", type=_positive, default=ServiceModel.cold_factor,
                        help="slowdown of the first request after a model load")
    timing.add_argument("--jitter", type=_non_negative, default=ServiceModel.jitter_sigma,
                        help="log-normal sigma of service time")
    timing.add_argument("--throughput", type=_curve, default=MEASURED_THROUGHPUT,
                        help="total throughput at 1,2,3,... concurrent requests (default: measured)")
    gpu = p.add_argument_group("shared GPU (synthetic engine)")
    gpu.add_argument("--gpu", metavar="ID",
                     help="GPU id: busy processes with the same id share its throughput "
                          "(default: the first of CUDA_VISIBLE_DEVICES; '' or neither: alone)")
    gpu.add_argument("--gpu-curve", type=_gpu_curve, default=GpuCurve(), metavar="N:G,...",
                     help="total GPU throughput G with N busy processes, relative to one alone, "
                          f"interpolated, flat after the last (default: measured, {GpuCurve().as_text()})")
    gpu.add_argument("--gpu-state-dir", type=Path, default=None, metavar="DIR",
                     help=f"where processes on a GPU find each other (default: {default_state_dir()})")
    faults = p.add_argument_group("fault injection (also POST /emulator/faults)")
    faults.add_argument("--fail-status", type=int, choices=(200, 500))
    faults.add_argument("--fail-count", type=int)
    faults.add_argument("--crash-after", type=int, metavar="N", help="exit when TTS request N+1 arrives")
    faults.add_argument("--hang", action="store_true", help="never answer anything")
    faults.add_argument("--hang-after", type=int, metavar="N")
    faults.add_argument("--health-flap", type=_positive, metavar="SECONDS")
    faults.add_argument("--start-delay", type=_non_negative, default=0.0, metavar="SECONDS",
                        help="open the port only after this long (a slow start)")
    torch = p.add_argument_group("torch engine")
    torch.add_argument("--torch-preset", choices=("tiny", "glmtts"), default="tiny",
                       help="glmtts: GLM-TTS's shape (1.36 B parameters, bf16, CUDA)")
    torch.add_argument("--torch-device")
    torch.add_argument("--torch-dtype")
    torch.add_argument("--torch-hidden", type=int)
    torch.add_argument("--torch-layers", type=int)
    torch.add_argument("--torch-heads", type=int)
    torch.add_argument("--torch-vocab", type=int)
    return p


def make_gpu_share(args: argparse.Namespace) -> GpuShare | None:
    gpu_id = gpu_id_from(args.gpu, os.environ)
    if gpu_id is None or args.engine != "synthetic":  # the torch engine shares a real GPU for real
        return None
    return GpuShare.create(gpu_id, args.gpu_curve, args.gpu_state_dir)


def make_engine(args: argparse.Namespace, gpu: GpuShare | None = None) -> Engine:
    if args.engine == "torch":
        from glmtts.emulator.torch_engine import TorchEngine, TorchEngineConfig, torch_available

        if not torch_available():
            raise SystemExit("--engine torch needs the optional extra: pip install 'glmtts-sidecar[torch]'")
        config = TorchEngineConfig.glmtts_size() if args.torch_preset == "glmtts" else TorchEngineConfig()
        overrides = {
            "device": args.torch_device, "dtype": args.torch_dtype, "hidden_size": args.torch_hidden,
            "num_layers": args.torch_layers, "num_heads": args.torch_heads, "vocab_size": args.torch_vocab,
        }
        changes = {k: v for k, v in overrides.items() if v is not None}
        if "hidden_size" in changes:
            changes["intermediate_size"] = 4 * changes["hidden_size"]
        import dataclasses

        return TorchEngine(dataclasses.replace(config, **changes))
    model = ServiceModel(load_s=args.load_seconds, cold_factor=args.cold_factor, jitter_sigma=args.jitter,
                         time_scale=args.time_scale, throughput=args.throughput)
    return SyntheticEngine(model, seed=args.seed, gpu=gpu)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        faults = Faults(fail_status=args.fail_status, fail_count=args.fail_count,
                        crash_after=args.crash_after, hang=args.hang, hang_after=args.hang_after,
                        health_flap_s=args.health_flap)
        faults.validate()
        upstream = UpstreamConfig.from_env()
    except (FaultSpecError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    store = PromptStore(args.prompt_cache)
    store.load()
    gpu = make_gpu_share(args)
    if gpu is not None:
        logging.getLogger("glmtts.emulator").info("sharing GPU %s with processes in %s (curve %s)",
                                                  gpu.gpu_id, gpu.registry.directory, gpu.curve.as_text())
    engine = make_engine(args, gpu)
    # The torch engine runs in real time; scaling its timeouts would make them meaningless.
    scale = args.time_scale if args.engine == "synthetic" else 1.0
    emulator = Emulator(engine, store, EmulatorOptions(time_scale=scale, upstream=upstream, faults=faults, gpu=gpu))
    if args.start_delay:
        logging.getLogger("glmtts.emulator").info("slow start: opening the port in %.1f s", args.start_delay)
        time.sleep(args.start_delay)
    app = emulator.make_app(max_body_bytes=int(args.max_body_mb * 1024 * 1024))
    web.run_app(app, host=args.host, port=args.port, keepalive_timeout=UVICORN_KEEPALIVE_S,
                access_log=None, print=lambda msg: print(msg, flush=True), handle_signals=True,
                shutdown_timeout=1.0, loop=new_event_loop())


if __name__ == "__main__":
    main()
