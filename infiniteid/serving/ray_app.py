"""The server as a Ray Serve deployment: one replica per GPU, Serve's HTTP proxy in front.

Each replica is the same FastAPI application (:func:`~.app.create_app`) with its own
runtime, micro-batcher and ``c_id`` cache; Serve routes requests among replicas and
``num_gpus`` per replica pins each to its own GPU (``0`` for CPU replicas). Use it from
``infiniteid serve --ray --replicas N`` or a Serve config file naming
:func:`build_app` (``import_path: infiniteid.serving.ray_app:build_app``, ``args``:
the :class:`~.config.ServerConfig` fields plus ``replicas``, ``num_gpus``, ``num_cpus``,
``autoscaling``). ``ray`` is imported only here, and only when called.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from .config import ServerConfig

DEPLOYMENT = "InfiniteIDServer"


def _config(args: Dict[str, Any]) -> ServerConfig:
    d = dict(args)
    for key in ("bundle", "face_models"):
        if d.get(key) is not None:
            d[key] = Path(d[key])
    return ServerConfig(**d).validate()


def deployment(config: ServerConfig, replicas: int = 1, num_gpus: float = 1.0, num_cpus: float = 1.0,
               autoscaling: Optional[Dict[str, Any]] = None) -> Any:
    """A bound Serve application of the server. ``autoscaling`` (Serve's
    ``autoscaling_config``: ``min_replicas``, ``max_replicas``,
    ``target_ongoing_requests``...) replaces the fixed ``replicas`` when given."""
    from ray import serve

    from .app import create_app

    class InfiniteIDServer:
        def __init__(self, cfg: Dict[str, Any]):
            self.config = _config(cfg)

        def __serve_build_asgi_app__(self) -> Any:
            return create_app(self.config, load_in_background=False)

    options: Dict[str, Any] = {
        "name": DEPLOYMENT,
        "ray_actor_options": {"num_gpus": num_gpus, "num_cpus": num_cpus},
        # admission is the replica's own bounded queue (429 past it); Serve may hand a replica
        # a little more than it admits so that 429s come from one place
        "max_ongoing_requests": config.queue + max(config.max_batch, 1) + 4,
        "health_check_period_s": 5,
    }
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas
    cls = serve.deployment(**options)(serve.ingress()(InfiniteIDServer))
    return cls.bind(config.to_dict())


def build_app(args: Dict[str, Any]) -> Any:
    """Serve config files' entry point (``import_path: infiniteid.serving.ray_app:build_app``)."""
    args = dict(args)
    replicas = int(args.pop("replicas", 1))
    num_gpus = float(args.pop("num_gpus", 1.0))
    num_cpus = float(args.pop("num_cpus", 1.0))
    autoscaling = args.pop("autoscaling", None)
    return deployment(_config(args), replicas, num_gpus, num_cpus, autoscaling)


def run(config: ServerConfig, replicas: int, num_gpus: float, num_cpus: float, address: Optional[str] = None,
        name: str = "infiniteid") -> str:
    """Start (or join) Ray, start Serve's HTTP proxy on ``config.host:config.port`` and deploy;
    returns the URL. :func:`stop` tears it down."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level="warning")
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(deployment(config, replicas, num_gpus, num_cpus), name=name, route_prefix="/", blocking=False)
    return f"http://{config.host}:{config.port}"


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
