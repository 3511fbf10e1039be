"""Pytest fixtures for the fake Kubernetes API, its simulators, and the adapter pointed at it.

Registered from tests/conftest.py (`pytest_plugins`), so any test module can ask for:

    kube_api      a started FakeKubeAPI (bookmarks only on send_bookmarks(), for a fixed event order)
    kube_client   an official-client ApiClient for it (workers.adapters.kube.api_client_for)
    kube_cluster  workers.adapters.kube.KubeCluster over kube_client (Tekton v1)
    tekton        a TektonSimulator (explicit steps; reacts to cancel/pending on its own)
    rollout       a RolloutSimulator (rollouts complete after one step)
"""

from __future__ import annotations

from collections.abc import Iterator

import kubernetes
import pytest

from tests.support.fakes.kube_api import FakeKubeAPI
from tests.support.fakes.rollout import RolloutSimulator
from tests.support.fakes.tekton import TektonSimulator
from workers.adapters.kube import KubeCluster, api_client_for


@pytest.fixture
def kube_api() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI(bookmark_interval=None) as api:
        yield api


@pytest.fixture
def kube_client(kube_api: FakeKubeAPI) -> Iterator[kubernetes.client.ApiClient]:
    client = api_client_for(kubernetes.client.Configuration(host=kube_api.url))
    yield client
    client.close()


@pytest.fixture
def kube_cluster(kube_client: kubernetes.client.ApiClient) -> KubeCluster:
    return KubeCluster(kube_client)


@pytest.fixture
def tekton(kube_api: FakeKubeAPI) -> Iterator[TektonSimulator]:
    sim = TektonSimulator(kube_api)
    yield sim
    sim.stop()


@pytest.fixture
def rollout(kube_api: FakeKubeAPI) -> Iterator[RolloutSimulator]:
    sim = RolloutSimulator(kube_api)
    yield sim
    sim.stop()
