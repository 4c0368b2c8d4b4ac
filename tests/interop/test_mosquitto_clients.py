"""The Mosquitto command-line clients against mqttd: what an operator tries first."""

import pytest

from clitools import MosquittoSub, mosquitto_pub

VERSIONS = pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])


@VERSIONS
@pytest.mark.parametrize("qos", ["0", "1", "2"])
def test_mosquitto_pub_to_mosquitto_sub(broker, mosquitto_sub, version, qos):
    sub = mosquitto_sub("-V", version, "-q", qos, "-t", "cli/+", "-C", "2")
    sub.wait_for("received SUBACK")

    mosquitto_pub(broker.port, "-V", version, "-q", qos, "-t", "cli/a", "-m", "first")
    mosquitto_pub(broker.port, "-V", version, "-q", qos, "-t", "cli/b", "-m", "second")

    assert sub.messages(2) == [f"cli/a|{qos}|0|first", f"cli/b|{qos}|0|second"]
    assert sub.finish() == 0


def test_mosquitto_pub_retained_then_mosquitto_sub(broker, mosquitto_sub):
    mosquitto_pub(broker.port, "-q", "1", "-r", "-t", "cli/retained", "-m", "kept")

    sub = mosquitto_sub("-q", "1", "-t", "cli/#", "-C", "1")

    assert sub.messages(1) == ["cli/retained|1|1|kept"]
    assert sub.finish() == 0

    # A retained message with no payload deletes it: a new subscriber sees nothing retained
    # and then receives a live message (-R would hide retained ones; we want to see them).
    mosquitto_pub(broker.port, "-q", "1", "-r", "-t", "cli/retained", "-n")
    sub = mosquitto_sub("-q", "1", "-t", "cli/#", "-C", "1")
    sub.wait_for("received SUBACK")
    mosquitto_pub(broker.port, "-q", "1", "-t", "cli/live", "-m", "now")
    assert sub.messages(1) == ["cli/live|1|0|now"]
    assert sub.finish() == 0


@VERSIONS
def test_mosquitto_sub_persistent_session_gets_queued_messages(broker, mosquitto_sub, version):
    # -c: clean session 0 (for v5, session expiry "never"); -E exits once subscribed.
    first = mosquitto_sub("-V", version, "-c", "-i", "cli-persistent", "-q", "1",
                          "-t", "cli/queue", "-E")
    assert first.finish() == 0

    for i in range(3):
        mosquitto_pub(broker.port, "-V", version, "-q", "1", "-t", "cli/queue", "-m", f"m{i}")

    again = mosquitto_sub("-V", version, "-c", "-i", "cli-persistent", "-q", "1",
                          "-t", "cli/queue", "-C", "3")
    assert again.messages(3) == ["cli/queue|1|0|m0", "cli/queue|1|0|m1", "cli/queue|1|0|m2"]
    assert again.finish() == 0


def test_mosquitto_sub_sees_will_of_killed_client(broker, mosquitto_sub):
    sub = mosquitto_sub("-t", "cli/will", "-C", "1", "-q", "1")
    sub.wait_for("received SUBACK")
    # A mosquitto_sub with a will, killed with SIGKILL: no DISCONNECT is sent.
    victim = MosquittoSub(broker.port, "-t", "cli/nothing", "--will-topic", "cli/will",
                          "--will-payload", "gone", "--will-qos", "1")
    try:
        victim.wait_for("received SUBACK")
        victim.proc.kill()
        victim.proc.wait()
        assert sub.messages(1) == ["cli/will|1|0|gone"]
    finally:
        if victim.proc.poll() is None:
            victim.proc.kill()
            victim.proc.wait()


def test_mosquitto_v5_properties_pass_through(broker, mosquitto_sub):
    sub = mosquitto_sub("-V", "mqttv5", "-q", "1", "-t", "cli/props", "-C", "1",
                        "-F", "MSG %t|%C|%P|%R|%p")
    sub.wait_for("received SUBACK")
    mosquitto_pub(broker.port, "-V", "mqttv5", "-q", "1", "-t", "cli/props", "-m", "payload",
                  "-D", "publish", "content-type", "text/plain",
                  "-D", "publish", "user-property", "origin", "cli",
                  "-D", "publish", "response-topic", "cli/reply")
    assert sub.messages(1) == ["cli/props|text/plain|origin:cli|cli/reply|payload"]
    assert sub.finish() == 0

