"""MQTT over WebSocket and TLS with real clients: paho-mqtt (TCP, TLS, and its websockets
transport on the path `/mqtt`, plain and over TLS) and MQTT.js on Node, against the broker's
ws://, wss:// and tls:// listeners (TLS clients trust the CA the broker generated), and across
to TCP clients."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pahoclient import BOTH_VERSIONS, TIMEOUT, V5

HERE = Path(__file__).resolve().parent
MQTTJS = HERE / "mqttjs"


@BOTH_VERSIONS
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_paho_over_websocket_publishes_and_subscribes(client, version, qos):
    sub = client(version=version, ws=True)
    assert sub.subscribe("ws/t", qos) == [qos]
    pub = client(version=version, ws=True)
    pub.publish("ws/t", b"hello", qos)
    pub.publish("ws/other", b"not for sub", qos)

    received = sub.collect_until_marker(pub)

    assert [(m.topic, m.payload, m.qos) for m in received] == [("ws/t", b"hello", qos)]


def test_websocket_and_tcp_clients_reach_each_other(client):
    ws_sub, tcp_sub = client(ws=True), client()
    for s in (ws_sub, tcp_sub):
        assert s.subscribe("mixed/#", 1) == [1]
    client(ws=True).publish("mixed/from-ws", b"a", 1)
    client().publish("mixed/from-tcp", b"b", 1)

    for s in (ws_sub, tcp_sub):
        assert sorted((m.topic, m.payload) for m in s.recv_n(2)) == [
            ("mixed/from-tcp", b"b"), ("mixed/from-ws", b"a")]


@BOTH_VERSIONS
@pytest.mark.broker_config("max_packet_size = 2097152")
def test_one_mebibyte_payload_over_websocket(client, version):
    payload = os.urandom(1024 * 1024)
    ws_sub, tcp_sub = client(version=version, ws=True), client(version=version)
    for s in (ws_sub, tcp_sub):
        assert s.subscribe("big/t", 1) == [1]
    pub = client(version=version, ws=True)
    pub.publish("big/t", payload, 1)

    for s in (ws_sub, tcp_sub):
        (m,) = s.recv_n(1)
        assert (m.topic, len(m.payload), m.payload == payload) == ("big/t", len(payload), True)


@pytest.mark.broker_config("max_packet_size = 1000")
def test_max_packet_size_applies_over_websocket(client):
    c = client(version=V5, ws=True)
    assert c.connack_properties.MaximumPacketSize == 1000
    c.publish("mps/ok", b"x" * 900, 1)
    c.publish("mps/big", b"x" * 2000, 1, wait=False)
    assert c.wait_disconnected().value == 0x95  # Packet too large


def run_mqttjs(broker, version: int, tls: bool = False) -> dict:
    node = shutil.which("node")
    assert node, "Node.js is missing: tests/interop/run.sh installs it"
    assert (MQTTJS / "node_modules" / "mqtt").is_dir(), (
        "MQTT.js is missing: tests/interop/run.sh runs `npm ci` in tests/interop/mqttjs")
    if tls:
        args = [f"wss://localhost:{broker.wss_port}/mqtt", str(version), broker.ca_file]
    else:
        args = [f"ws://127.0.0.1:{broker.ws_port}/mqtt", str(version)]
    done = subprocess.run([node, str(MQTTJS / "pubsub.js"), *args],
                          capture_output=True, text=True, timeout=2 * TIMEOUT)
    assert done.returncode == 0, f"MQTT.js failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


@pytest.mark.parametrize("version", [3, 4, 5], ids=["v31", "v311", "v5"])
def test_mqttjs_over_websocket_publishes_and_subscribes(broker, client, version):
    # MQTT.js offers the subprotocol "mqttv3.1" for MQTT 3.1 and "mqtt" for the others.
    tcp_sub = client()
    assert tcp_sub.subscribe("mqttjs/out", 1) == [1]

    result = run_mqttjs(broker, version)

    assert result["received"] == [
        {"topic": "mqttjs/echo", "payload": f"hello from MQTT.js v{version}", "qos": 1}]
    (m,) = tcp_sub.recv_n(1)
    assert (m.topic, m.payload, m.qos) == ("mqttjs/out", bytes([7]) * 100_000, 1)


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_mqttjs_over_websocket_over_tls(broker, client, version):
    tcp_sub = client()
    assert tcp_sub.subscribe("mqttjs/out", 1) == [1]

    result = run_mqttjs(broker, version, tls=True)

    assert result["received"] == [
        {"topic": "mqttjs/echo", "payload": f"hello from MQTT.js v{version}", "qos": 1}]
    (m,) = tcp_sub.recv_n(1)
    assert (m.topic, m.payload, m.qos) == ("mqttjs/out", bytes([7]) * 100_000, 1)


@BOTH_VERSIONS
@pytest.mark.parametrize("ws", [False, True], ids=["tls", "wss"])
def test_paho_over_tls_and_websocket_over_tls(client, version, ws):
    sub = client(version=version, ws=ws, tls=True)
    assert sub.subscribe("secure/t", 2) == [2]
    tcp_sub = client(version=version)
    assert tcp_sub.subscribe("secure/t", 1) == [1]
    pub = client(version=version, ws=ws, tls=True)
    pub.publish("secure/t", b"over tls", 2)

    received = sub.collect_until_marker(pub)

    assert [(m.topic, m.payload, m.qos) for m in received] == [("secure/t", b"over tls", 2)]
    (m,) = tcp_sub.recv_n(1)
    assert (m.topic, m.payload) == ("secure/t", b"over tls")


@BOTH_VERSIONS
@pytest.mark.broker_config("max_packet_size = 2097152")
def test_one_mebibyte_payload_over_websocket_over_tls(client, version):
    payload = os.urandom(1024 * 1024)
    wss_sub = client(version=version, ws=True, tls=True)
    assert wss_sub.subscribe("bigtls/t", 1) == [1]
    pub = client(version=version, ws=True, tls=True)
    pub.publish("bigtls/t", payload, 1)

    (m,) = wss_sub.recv_n(1)
    assert (m.topic, len(m.payload), m.payload == payload) == ("bigtls/t", len(payload), True)
