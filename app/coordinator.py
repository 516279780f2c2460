"""The tool coordinator: selects the requested tools (through a cache) and runs them.

Every run is recorded by ``track_coordinator("ToolCoordinator")`` and every tool by
``track_tool(name)``. A tool's failure stays in its result and the other tools still run;
the coordinator run then counts as failed (``victor_coordinator_errors_total``), because
it did not deliver everything it was asked for.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from victor_mp_metrics.instrument import (
    record_cache_hit,
    record_cache_miss,
    set_cache_size,
    track_coordinator,
    track_tool,
)

from .tools import TOOLS, Tool, ToolContext, ToolError

COORDINATOR_NAME = "ToolCoordinator"
CACHE_NAME = "tool_selection"


@dataclass(frozen=True)
class ToolCall:
    """One requested tool and its argument (``None`` when the request gave none)."""

    name: str
    argument: str | None


class ToolSelectionCache:
    """An LRU map from the tuple of requested tool names to the selected tools.

    Thread-safe (gthread workers share it). Each lookup counts a hit or a miss of cache
    ``tool_selection``; each change sets its approximate size in bytes.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, ...], tuple[Tool, ...]] = OrderedDict()
        self._lock = threading.Lock()
        self._nbytes = 0

    def select(self, names: tuple[str, ...]) -> tuple[tuple[Tool, ...], Literal["hit", "miss"]]:
        """The tools named by ``names``, in order, and whether the cache had them."""
        with self._lock:
            tools = self._entries.get(names)
            if tools is not None:
                self._entries.move_to_end(names)
                record_cache_hit(CACHE_NAME)
                return tools, "hit"
            record_cache_miss(CACHE_NAME)
            tools = tuple(TOOLS[name] for name in names)
            self._entries[names] = tools
            if len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            self._nbytes = self._measure()
            set_cache_size(CACHE_NAME, self._nbytes)
            return tools, "miss"

    @property
    def nbytes(self) -> int:
        """The approximate size in bytes last reported to ``victor_cache_size_bytes``."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def _measure(self) -> int:
        # The tools themselves are shared module-level objects, not owned by the cache.
        size = sys.getsizeof(self._entries)
        for names, tools in self._entries.items():
            size += sys.getsizeof(names) + sum(sys.getsizeof(n) for n in names)
            size += sys.getsizeof(tools)
        return size


class ToolCoordinator:
    """Runs the tools of one chat request."""

    def __init__(self, cache: ToolSelectionCache, sandbox: str) -> None:
        self.cache = cache
        self.sandbox = sandbox

    def run(
        self, calls: Sequence[ToolCall], message: str
    ) -> tuple[list[dict[str, Any]], Literal["hit", "miss"]]:
        """One result per call, in order, and whether the tool selection was cached."""
        with track_coordinator(COORDINATOR_NAME) as run:
            tools, cached = self.cache.select(tuple(call.name for call in calls))
            context = ToolContext(message=message, sandbox=self.sandbox)
            results = [
                _run_tool(tool, call.argument, context)
                for tool, call in zip(tools, calls, strict=True)
            ]
            if any(result["status"] == "error" for result in results):
                run.fail("tool_error")
        return results, cached


def _run_tool(tool: Tool, argument: str | None, context: ToolContext) -> dict[str, Any]:
    try:
        with track_tool(tool.name):
            output = tool.run(argument, context)
    except ToolError as err:
        return {
            "tool": tool.name,
            "status": "error",
            "error_type": err.error_type,
            "error": str(err),
        }
    return {"tool": tool.name, "status": "success", "output": output}
