"""The tenant-limits policy, tested with slime-router's pytest fixtures only."""

from __future__ import annotations


def generate(r, tenant=None):
    headers = {"X-Tenant": tenant} if tenant else {}
    return r.client.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 4}},
                         headers=headers)


def test_a_tenant_over_its_rate_gets_429_and_others_are_served(slime_router, slime_mock_worker):
    r = slime_router(plugins=["tenant_limits"], extra_settings={"tenant_limits_rate": 0.01, "tenant_limits_burst": 3})
    got = [generate(r, "greedy") for _ in range(5)]
    assert [g.status_code for g in got] == [200, 200, 200, 429, 429]
    refused = got[-1]
    assert refused.json()["error"]["code"] == "tenant_rate_limited"
    assert int(refused.headers["retry-after"]) >= 1
    assert generate(r, "polite").status_code == 200  # another tenant has its own bucket
    assert generate(r).status_code == 200  # no tenant header: not limited
    assert len(slime_mock_worker.records()) == 5  # the refused requests never reached the worker
    assert r.client.get("/tenant_limits/stats").json() == {"greedy": {"served": 3, "refused": 2},
                                                           "polite": {"served": 1, "refused": 0}}


def test_a_tenant_pinned_to_a_worker_only_ever_reaches_that_worker(slime_router, slime_mock_worker_factory):
    workers = [slime_mock_worker_factory(seed=i) for i in range(3)]
    r = slime_router(plugins=["tenant_limits"], worker_urls=[w.url for w in workers],
                     extra_settings={"tenant_limits_pin": True})
    for tenant in ("a", "b", "c", "d", "e", "f"):
        for _ in range(3):
            assert generate(r, tenant).status_code == 200
    per_worker = [len(w.records()) for w in workers]
    assert sum(per_worker) == 18 and all(n % 3 == 0 for n in per_worker)  # each tenant's 3 requests together
    assert sum(1 for n in per_worker if n) >= 2  # six tenants do not all hash to one worker


def test_without_pinning_requests_are_spread_over_the_workers(slime_router, slime_mock_worker_factory):
    workers = [slime_mock_worker_factory(seed=i) for i in range(2)]
    r = slime_router(plugins=["tenant_limits"], worker_urls=[w.url for w in workers])
    for _ in range(4):
        assert generate(r, "a").status_code == 200
    assert [len(w.records()) for w in workers] == [2, 2]  # the core's round robin decides
