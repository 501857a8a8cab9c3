"""mbmd (Modbus gateway): ``mbmd/<device>/<Measurement>`` with a ``%.3f`` payload.

Read: ``Power`` W and ``Import`` kWh (lifetime) as ``mbmd/<device>``.  Ignored:
every other measurement (``Voltage``, ``Current``, ``Export``, ``Sum``,
``Frequency``, ...), phase sub-topics such as ``Power/L1`` (the device total
is used, the phases would count twice) and the gateway's ``mbmd/status``
(connected/disconnected of the gateway, not of a meter).  mbmd sends no time:
readings are stamped on receipt.  ``base_topic`` defaults to ``mbmd``.
"""

from __future__ import annotations

from collections.abc import Mapping

from monitor.model import ParseError, ParseResult, Reading, TsSource
from monitor.parsers.common import IGNORED, check_options, str_option, text_measurement


class MbmdParser:
    """Parser for ``format = "mbmd"``.  Option ``base_topic`` (default ``mbmd``)."""

    def __init__(self, options: Mapping[str, object] | None = None) -> None:
        opts = check_options("mbmd", options, ("base_topic",))
        self._prefix = str_option("mbmd", opts, "base_topic", "mbmd") + "/"

    def parse(
        self, topic: str, payload: bytes, received_at: float, retained: bool = False
    ) -> ParseResult:
        if not topic.startswith(self._prefix):
            raise ParseError("unknown_topic", f"{topic!r} is not under {self._prefix!r}")
        segs = topic[len(self._prefix):].split("/")
        if not segs[0]:
            raise ParseError("unknown_topic", topic)
        if len(segs) == 1:
            if segs[0] == "status":
                return IGNORED
            raise ParseError("unknown_topic", f"{topic!r} is not <base>/<device>/<Measurement>")
        if len(segs) > 3 or not segs[1]:
            raise ParseError("unknown_topic", f"{topic!r} is not <base>/<device>/<Measurement>")
        if len(segs) == 3:
            return IGNORED  # phase sub-topics: Power/L1, Current/L2, ...
        device = "mbmd/" + segs[0]
        measure = segs[1]
        if measure == "Power":
            value = text_measurement(payload, topic)
            return ParseResult(readings=(Reading(device, received_at, TsSource.RECEIVED, value),))
        if measure == "Import":
            value = text_measurement(payload, topic)
            return ParseResult(readings=(
                Reading(device, received_at, TsSource.RECEIVED, None, value),
            ))
        return IGNORED
