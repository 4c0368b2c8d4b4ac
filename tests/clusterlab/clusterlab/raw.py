"""The interoperability suite's MQTT codec (`tests/interop/mqttraw.py`), written from the
specification, for the lab's subscribers."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "interop"))

from mqttraw import *  # noqa: E402,F401,F403
from mqttraw import Closed, Packet, RawClient  # noqa: E402,F401
