"""Ray precompute job end to end on a real local Ray cluster and a real S3 server."""
from __future__ import annotations


def test_ray_cluster_fixture(ray_cluster, monkeypatch):
    import ray

    for k, v in ray_cluster.env.items():
        monkeypatch.setenv(k, v)
    ray.init(address=ray_cluster.address, log_to_driver=False)
    try:
        @ray.remote(num_cpus=1)
        def square(x):
            return x * x

        assert ray.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]
        assert ray.cluster_resources()["CPU"] == 2
    finally:
        ray.shutdown()
