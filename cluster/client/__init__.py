"""The Ray client library: connecting to Ray (`ray_connect`), the cluster token (`auth`), the Jobs API client
(`jobs_client`), packaging and submitting a job (`packaging`, `submission`), following its logs (`follow`), and
what Ray prints (`console`). The CLI (cluster/cli.py, cluster/commands/) and the service (service/) both use it;
it imports neither (tests/unit/test_imports.py keeps it so)."""
