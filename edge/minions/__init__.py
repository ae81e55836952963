"""Minion / MinionS: a private document stays on the device; the cloud plans, the edge reads.

Chunking, the plan and its jobs, the edge workers, the cloud chat model and cost accounting.
"""

from tether.edge.minions._chunking import Chunk, ChunkingOptions, chunk_documents
from tether.edge.minions._cost import CostReport, PriceTable, Pricing, RoundCost
from tether.edge.minions._plan import ChunkSelector, Job, MinionsError, PlanError, PlanLimits
from tether.edge.minions._remote import ChatModel, OpenAIChat, RemoteChatError, SessionChat
from tether.edge.minions._types import AskResult, CloudExchange, MinionsFailed, MinionsOptions, Round, WorkerResult

__all__ = ["AskResult", "ChatModel", "Chunk", "ChunkSelector", "ChunkingOptions", "CloudExchange", "CostReport", "Job", "MinionsError", "MinionsFailed", "MinionsOptions", "OpenAIChat", "PlanError", "PlanLimits", "PriceTable", "Pricing", "RemoteChatError", "Round", "RoundCost", "SessionChat", "WorkerResult", "chunk_documents"]
