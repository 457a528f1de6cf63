"""The torch-free heart of the engine: requests, KV block bookkeeping with prefix caching, and the
scheduler. Nothing here imports torch (tests/core enforces it)."""

from ember.core.block_manager import BlockManager, CachedPrefix
from ember.core.outputs import ScheduledRequest, SchedulerOutput
from ember.core.request import Request, RequestStatus
from ember.core.scheduler import Scheduler, SchedulerPolicy

__all__ = ["BlockManager", "CachedPrefix", "Request", "RequestStatus", "ScheduledRequest", "Scheduler",
           "SchedulerOutput", "SchedulerPolicy"]
