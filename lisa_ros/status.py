"""What became of a query: the status codes of lisa_ros/SegmentationResult, without ROS imports.

The values are the message's STATUS_* constants (a test keeps the two equal), so the worker, the
offline bag tool and the node's counters use one set of names.
"""

from __future__ import annotations

import enum


class Status(enum.IntEnum):
    OK = 0
    NO_FRAME = 1
    FRAME_TOO_OLD = 2
    QUEUE_FULL = 3
    BAD_QUERY = 4
    BAD_IMAGE = 5
    MODEL_NOT_LOADED = 6
    MODEL_ERROR = 7
    TIMEOUT = 8
    CANCELLED = 9
    INACTIVE = 10
    SHUTTING_DOWN = 11

    @property
    def label(self) -> str:
        """The name as counters and diagnostics show it, e.g. 'frame_too_old'."""
        return self.name.lower()
