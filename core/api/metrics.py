"""Prometheus metrics, read from the store at scrape time (no second copy of the state)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from core.service import PoolService


class PoolCollector(Collector):
    def __init__(self, service: PoolService) -> None:
        self._service = service

    def collect(self) -> Iterator[GaugeMetricFamily]:
        store, now = self._service.store, self._service.clock()
        vms = GaugeMetricFamily("alienec2_vms", "VMs by state", labels=["state"])
        for state, count in store.vm_counts().items():
            vms.add_metric([str(state)], count)
        yield vms
        jobs = GaugeMetricFamily("alienec2_jobs", "Jobs by state", labels=["state"])
        for job_state, count in store.job_counts().items():
            jobs.add_metric([str(job_state)], count)
        yield jobs
        slots = self._service.slots()
        yield GaugeMetricFamily("alienec2_slots_used", "Job slots holding a job", slots["used"])
        yield GaugeMetricFamily(
            "alienec2_slots", "Job slots on registered VMs that are not leaving", slots["total"]
        )
        low, high = self._service.bounds()
        yield GaugeMetricFamily("alienec2_pool_min_vms", "Pool minimum", value=low)
        yield GaugeMetricFamily("alienec2_pool_max_vms", "Pool maximum", value=high)
        yield GaugeMetricFamily(
            "alienec2_scaling_paused", "1 if scaling is paused", value=int(self._service.paused())
        )
        backoff = GaugeMetricFamily(
            "alienec2_cloud_backoff_seconds",
            "Seconds until a cloud is used again",
            labels=["cloud"],
        )
        for cloud in self._service.config.clouds:
            left = max(store.cloud_status(cloud.name).backoff_until - now, 0.0)
            backoff.add_metric([cloud.name], left)
        yield backoff
        yield GaugeMetricFamily(
            "alienec2_events_total", "Last event sequence", value=store.last_seq()
        )


def render(service: PoolService) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(service))
    return generate_latest(registry)
