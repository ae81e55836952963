"""Fixtures for the routers: the tiny edge/cloud pair and toy tokenizer of the edge tests."""

from __future__ import annotations

from tests.edge.conftest import cloud_manager, edge_model, tiny_cloud_hf, tiny_edge_hf, toy_tokenizer  # noqa: F401

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():  # type: ignore[no-untyped-def]
    """Tiny models run faster on one thread, and far faster on a busy shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
