"""Serving: an HTTP server over the torch-free runtime, its load generator, and scale-out on Ray Serve.

Modules, lowest first (each imports only those above it and :mod:`infiniteid.runtime`):

``config``   :class:`ServerConfig`, the server's typed settings and their checks;
``forms``    request parsing: JSON and multipart bodies (read into memory, never to
             disk), face image decoding with size and decompression-bomb guards, and
             the one field list both body kinds share (:class:`GenerateFields`);
``cache``    :class:`IdentityCache`, an LRU of ``c_id`` bounded in bytes, keyed by the
             decoded face pixels' hash and the bundle's ID-encoder hash;
``metrics``  :class:`ServerMetrics`, the Prometheus counters and histograms (one registry
             per server);
``engine``   :class:`ServingEngine`: the runtime, the cache, warm-up, identity encoding
             (off the batch path) and one batch at a time on the backend;
``batcher``  :class:`MicroBatcher`: a bounded queue that joins compatible requests into
             batches within a time window, deadlines, and draining on shutdown;
``page``     the minimal HTML page served at ``/``;
``app``      :func:`create_app`, the FastAPI application (``/v1/generate``, ``/healthz``,
             ``/readyz``, ``/metrics``, ``/``);
``loadgen``  the online load generator (concurrency sweep against a URL) and the
             offline benchmark of a bundle, used by ``infiniteid bench``;
``ray_app``  the same application as a Ray Serve deployment (``ray`` imported lazily).

Never imports torch, diffusers or transformers (a test checks it in a fresh interpreter).
"""
