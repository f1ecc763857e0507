"""The test harness: real processes, really started, for the suite's fixtures (tests/conftest.py), its test
modules and the benchmarks (benchmarks/). A module per concern; import from the module that holds a name:

- ``processes``: the checkout (``ROOT``) and its commands (``BIN``); ``free_port``; ``spawn`` and
  ``stop_process`` for process groups; ``wait_until``, which says what it last saw when it times out.
- ``servers``: ``RedisServer``, ``TorchServeServer`` (on free ports, from the project's config.properties),
  a ``Stack`` of uvicorn gateways and arq workers in front of them, and their environments (``stack_env``,
  ``side_by_side_env``); the random-weights archive (``build_model_store``, ``SEED``); ``WEBHOOK_SECRET``.
- ``receiver``: a webhook ``Receiver``, an HTTP server in the test's process that records each request.
- ``s3``: ``CephS3``, a one-node Ceph cluster with its RADOS Gateway: a real S3 API server on loopback.
- ``jobs``: jobs made as a gateway makes them (the input in the blob store first), for tests that drive the
  job store directly (``directory_store``, ``directory_blobs``, ``submit``).
- ``images``: ``scene`` draws a picture with large shapes; ``encode`` makes it a file's bytes.
- ``handler``: the TorchServe handler in the test's own process (``Context``, ``make_handler``, ``run``)
  and the reference its masks are held to (``mask_of``, ``full_size_probabilities``). Imports torch.
- ``sentinel``: Redis with replicas and Sentinel (``ReplicatedRedis`` on loopback, ``sentinel_config``),
  and what a test asks them (``primary_address``, ``online_replicas``).
- ``namespaces``: many hosts on one machine, as Linux network namespaces on a bridge (``Network``,
  ``Host``); needs root (``namespaces_unavailable`` says why not).
- ``hosts``: what runs on those hosts: Redis, Sentinel, TorchServe, an arq worker and a gateway.
- ``kubernetes``: deploy/kubernetes rendered by `kubectl kustomize` (``render``, ``Rendered``), and lookups
  in its workloads (``pod_spec``, ``containers_of``, ``env_of``, ``selects``).

Nothing here is a fixture, and importing a module starts nothing: the fixtures decide what runs when.
"""
