"""
The one exception type of zaichik: a protocol error with its code.

The broker raises it where a request must be answered with an ERROR frame;
the client library raises it when the broker answers a request with one.
"""

from __future__ import annotations

from zaichik.codec import ErrorCode


class ZaichikError(Exception):
    """
    An error with a protocol L{ErrorCode}.

    @ivar code: the L{ErrorCode} (an C{int} for codes this version does not
        know).
    @ivar message: the human-readable text.
    """

    def __init__(self, code: int, message: str = "") -> None:
        try:
            code = ErrorCode(code)
        except ValueError:
            pass
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        name = getattr(self.code, "name", str(self.code))
        return f"{name}: {self.message}" if self.message else name
