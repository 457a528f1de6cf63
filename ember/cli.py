"""`ember`: the command line (DESIGN 1.2). The only place in ember that reads environment variables.

Every command builds its `EngineConfig` with `load_config` and passes it down; engine modules are
imported lazily, so `ember check` and `ember --help` start fast and need no torch.
Exit codes: 0 ok, 1 runtime failure, 2 invalid config or usage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from ember.errors import ConfigError, EngineDeadError, WorkerStartError

API_KEY_ENV = "EMBER_API_KEY"  # read only here, so the key need not appear in argv (ps)
ENGINE_CACHE_ENV = "EMBER_ENGINE_CACHE_DIR"  # default of --engine-cache-dir (ember.engine_cache_dir)


def _fail(message: str, code: int) -> int:
    print(message, file=sys.stderr)
    return code


def _config(source, **overrides):
    from ember.config import load_config

    return load_config(source, **overrides)


def cmd_check(args) -> int:
    import yaml

    cfg = _config(args.config)
    sys.stdout.write(yaml.safe_dump(cfg.normalized_dict(), sort_keys=False))
    return 0


def _lora_adapters(cfg, specs: list[str]) -> dict:
    """The config's `build.lora_adapters` plus `--lora NAME=PATH` ones (a local directory, else a cached HF repo)."""
    adapters = {k: v.model_dump(mode="json") for k, v in (cfg.trt_llm.build.lora_adapters or {}).items()}
    for spec in specs:
        name, sep, where = spec.partition("=")
        if not sep or not name or not where:
            raise ConfigError(f"--lora: {spec!r} is not NAME=PATH (a PEFT adapter directory or a cached HF repo)")
        local = os.path.exists(os.path.expanduser(where))
        adapters[name] = {"source": "LOCAL" if local else "HF",
                          "repo": os.path.abspath(os.path.expanduser(where)) if local else where}
    return adapters


def _engine_cache_dir(args) -> str | None:
    return args.engine_cache_dir or os.environ.get(ENGINE_CACHE_ENV) or None


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _built(cfg):
    """A config asking for a quantization_type: the cached engine's config, built here first when absent
    (ember.build.engine_cache), with its progress on stderr."""
    from ember.build.engine_cache import needs_build, resolve_engine

    return resolve_engine(cfg, log=_log) if needs_build(cfg) else cfg


def cmd_serve(args) -> int:
    # the server's own lines (start-up, drain, engine death) at INFO on stderr, as the engine core's process has them
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    cfg = _config(args.config, host=args.host, port=args.port, api_key=api_key,
                  engine_cache_dir=_engine_cache_dir(args))
    if args.lora:
        cfg = _config(cfg, lora_adapters=_lora_adapters(cfg, args.lora))
    cfg = _built(cfg)
    from ember.distributed.launch import join_launch, rank_env_from

    rank_env = rank_env_from(os.environ)  # set by torchrun: every rank runs `ember serve`, ranks > 0 as workers
    if rank_env is not None and join_launch(cfg, rank_env):
        return 0
    if args.backend == "ray":
        return _serve_on_ray(cfg, args)
    if args.replicas != 1:
        return _fail("ember serve: --replicas needs --backend ray (one `ember serve` is one replica)", 2)
    try:
        from ember.server.app import run_server
    except ImportError as e:
        return _fail(f"ember serve: the server is not built yet ({e})", 1)
    run_server(cfg)
    return 0


def _serve_on_ray(cfg, args) -> int:
    """`ember serve --backend ray`: N replicas of this config behind Ray Serve's HTTP proxy (ember.deploy.ray)."""
    try:
        from ember.deploy import ray as ember_ray
        import ray  # noqa: F401
    except ImportError:
        return _fail("ember serve --backend ray: Ray is not installed (pip install 'ember[ray]')", 1)
    if args.replicas < 1:
        return _fail("ember serve: --replicas must be at least 1", 2)
    opts = ember_ray.RayServeOptions(num_replicas=args.replicas, num_cpus_per_replica=args.cpus_per_replica,
                                     autoscaling=args.autoscale, min_replicas=1)
    ember_ray.run(cfg.model_dump(mode="json"), opts, host=cfg.ember.host, port=cfg.ember.port,
                  ray_address=args.ray_address)
    return 0


def cmd_generate(args) -> int:
    cfg = _built(_config(args.config, dtype=args.dtype, device=args.device, engine_cache_dir=_engine_cache_dir(args)))
    try:
        from ember import LLM, SamplingParams
    except ImportError as e:
        return _fail(f"ember generate: the engine is not built yet ({e})", 1)

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    llm = LLM(cfg)
    start = time.perf_counter()
    if args.raw:
        out = llm.generate([args.prompt], params)[0]
    else:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    elapsed = time.perf_counter() - start
    print(out.text)
    num = len(out.token_ids)
    m = out.metrics
    decode = ""
    if num > 1 and m.first_token_time is not None and m.finished_time is not None:
        decode = f", decode {(num - 1) / max(m.finished_time - m.first_token_time, 1e-9):.1f} tok/s"
    ttft = f"TTFT {m.ttft:.2f} s" if m.ttft is not None else "TTFT -"
    print(f"{num} tokens in {elapsed:.2f} s ({ttft}{decode})", file=sys.stderr)
    return 0


def cmd_build(args) -> int:
    cfg = _config(args.config)
    try:
        from ember.build.builder import build_engine
    except ImportError:
        return _fail("ember build: quantized engine building is not implemented yet", 1)
    out = build_engine(cfg, args.output, int4_group_size=args.int4_group_size, num_eval_prompts=args.num_eval_prompts,
                       progress=sys.stderr.isatty())
    print(f"engine written to {out}")
    return 0


def cmd_bench(args) -> int:
    from ember.bench.cli import main as bench_main

    return int(bench_main(args.rest) or 0)


def cmd_pull(args) -> int:
    from ember.checkpoint.default import pull_default_model

    try:
        print(pull_default_model(args.name))
    except ValueError as e:  # an unknown model name
        return _fail(f"ember pull: {e}", 2)
    return 0


def cmd_deploy(args) -> int:
    from ember.deploy.kubernetes import DeploySpec, write

    for path in write(args.config, args.output, DeploySpec(name=args.name, image=args.image, replicas=args.replicas)):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="LLM engine builder and OpenAI-compatible server.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    source_help = "config.yaml, Truss dir, model dir, engine dir or .gguf (default: the default model)"
    cache_help = (f"where engines built for a config's quantization_type are cached (default: ${ENGINE_CACHE_ENV}, "
                  "else ember.engine_cache_dir, else ~/.cache/ember/engines)")

    p = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    p.add_argument("config", nargs="?", help=source_help)
    p.add_argument("--host", help="bind address (default: ember.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: ember.port, 8000; 0 picks a free one)")
    p.add_argument("--api-key", help=f"require this Bearer token (default: ember.api_key, or ${API_KEY_ENV})")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="serve a PEFT LoRA adapter as model NAME (repeatable; adds to build.lora_adapters)")
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local: this process serves (default); ray: --replicas engines behind Ray Serve (ember[ray])")
    p.add_argument("--replicas", type=int, default=1, help="ray: number of engine replicas (with --autoscale, the most)")
    p.add_argument("--autoscale", action="store_true",
                   help="ray: scale between 1 and --replicas replicas on ongoing requests per replica")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="ray: CPUs Ray reserves per replica")
    p.add_argument("--ray-address", default=None, help="ray: join this cluster (default: start a local one)")
    p.add_argument("--engine-cache-dir", help=cache_help)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("build", help="resolve, quantize and calibrate a checkpoint into an engine directory")
    p.add_argument("config", help="config.yaml")
    p.add_argument("-o", "--output", required=True, help="engine directory to write")
    p.add_argument("--int4-group-size", type=int, choices=[32, 64, 128], default=128,
                   help="int4: weights per scale group (default 128; smaller where a row does not divide)")
    p.add_argument("--num-eval-prompts", type=int, default=8, help="held-out prompts for the quality report")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("generate", help="one-off generation; prints the text, and its speed on stderr")
    p.add_argument("config", nargs="?", help=source_help)
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--engine-cache-dir", help=cache_help)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="benchmarks: `ember bench offline ...`, `ember bench serve --url ...`",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("pull", help="fetch a known model into the local model cache")
    p.add_argument("name", nargs="?", help="model name (default: the default model)")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("deploy", help="render Kubernetes manifests (ConfigMap, Deployment, Service) from a config")
    p.add_argument("target", choices=["kubernetes"])
    p.add_argument("config", help="config.yaml (its `resources` become the pod's requests)")
    p.add_argument("-o", "--output", default="k8s", help="directory to write the manifests to (default: k8s)")
    p.add_argument("--name", default="ember", help="Deployment/Service name and the pods' app label")
    p.add_argument("--image", default="ember:0.1.0", help="container image with ember installed")
    p.add_argument("--replicas", type=int, default=1)
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("check", help="validate a config without loading weights; prints it normalized")
    p.add_argument("config", help="config.yaml (or a model dir / .gguf)")
    p.set_defaults(func=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` is the bench harness's own (its --help too)
        args = argparse.Namespace(command="bench", func=cmd_bench, rest=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        return _fail(f"ember {args.command}: {e}", 2)
    except FileNotFoundError as e:  # a checkpoint the config names is not on this machine
        return _fail(f"ember {args.command}: {e}", 1)
    except (WorkerStartError, EngineDeadError) as e:  # the engine (or a tensor-parallel rank) could not start
        return _fail(f"ember {args.command}: {e}", 1)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
