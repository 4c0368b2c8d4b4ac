"""Authentication and authorization with real clients.

* Password files made by `mqttd passwd` and by Debian's `mosquitto_passwd`, used by paho
  (3.1.1 and 5.0), `mosquitto_pub` / `mosquitto_sub -u -P` and the raw client.
* SIGHUP reloads: new passwords and ACLs take effect, a broken file keeps the old rules.
* Mosquitto-style ACL files: the anonymous section, user sections, `%u` / `%c` patterns,
  read / write / readwrite, `deny` first; refused publishes and subscriptions.
* SCRAM-SHA-256 enhanced authentication (MQTT 5 AUTH), driven on a raw socket by
  `scramclient.py`, a client written from RFC 5802/7677 rather than from the broker's code:
  the exchange, wrong and unknown users, unknown methods, and re-authentication.

Every broker here has a password file (USERS, made with `mqttd passwd`) and, unless a test
says otherwise, no anonymous access: mqttd's default once a password file is set.
"""

import base64
import uuid

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

import mqttraw
from clitools import mosquitto_pub, mqttd_passwd
from mqttraw import AUTH, CONNACK, DISCONNECT, PINGRESP, PUBLISH, V311, V5
from pahoclient import BOTH_VERSIONS
from scramclient import ScramClient, ScramError

USERS = {"alice": "alice-pw", "bob": "bob-pw", "admin": "admin-pw", "carol": "carol-pw"}
MECHANISM = "SCRAM-SHA-256"

# MQTT 5 reason codes, and the MQTT 3.1.1 CONNACK return codes with the same meaning.
BAD_CREDENTIALS, NOT_AUTHORIZED, BAD_AUTH_METHOD = 0x86, 0x87, 0x8C
V311_BAD_CREDENTIALS, V311_NOT_AUTHORIZED = 4, 5
V311_SUBACK_FAILURE = 0x80

pytestmark = [pytest.mark.allow_anonymous(False), pytest.mark.password_file(USERS)]

# `deny` lines come both after (alice) and before (bob) the grant they cut into: either way
# the deny wins. `marker/#` lets every client take part in `collect_until_marker`.
ACL = pytest.mark.acl_file("""\
    # Anonymous clients (only where anonymous access is on).
    topic read public/#
    topic write anon/out

    user alice
    topic readwrite alice/#
    topic deny alice/secret
    topic write inbox/bob

    user bob
    topic deny public/internal
    topic read public/#
    topic read inbox/bob
    topic read anon/#

    user admin
    topic readwrite #

    # carol has no section: patterns only.

    pattern readwrite users/%u/#
    pattern write devices/%c/status
    pattern read devices/%c/cmd
    pattern readwrite marker/#
    """)


def login(user: str) -> dict:
    """paho connect arguments for one of USERS."""
    return {"username": user, "password": USERS[user]}


def sub_refused(version: int) -> int:
    return NOT_AUTHORIZED if version == V5 else V311_SUBACK_FAILURE


# --- passwords -----------------------------------------------------------------------------


@BOTH_VERSIONS
def test_mqttd_passwd_file_lets_users_in(broker, client, version):
    entries = dict(line.split(":", 1) for line in broker.password_file.read_text().split())
    assert all(h.startswith("$scram-sha-256$") for h in entries.values()), entries
    assert set(entries) == set(USERS)

    alice = client(version=version, **login("alice"))
    bob = client(version=version, **login("bob"))
    assert alice.subscribe("pw/t", 1) == [1]
    bob.publish("pw/t", b"hello", 1)
    assert alice.recv().payload == b"hello"


@BOTH_VERSIONS
@pytest.mark.parametrize("credentials, refusal", [
    ({"username": "alice", "password": "wrong"}, "Bad user name or password"),
    ({"username": "alice", "password": ""}, "Bad user name or password"),
    ({"username": "mallory", "password": "alice-pw"}, "Bad user name or password"),
    ({}, "Not authorized"),
], ids=["wrong-password", "empty-password", "unknown-user", "no-credentials"])
def test_paho_refused(client, version, credentials, refusal):
    c = client(version=version, connect=False)
    code, _, _ = c.connect(expect_success=False, **credentials)
    # paho reports a 3.1.1 return code as the MQTT 5 reason code of the same name.
    assert code == ReasonCode(PacketTypes.CONNACK, refusal), str(code)
    assert c.wait_disconnected() is not None


@pytest.mark.parametrize("credentials, v5_reason, v311_code", [
    ({"username": "alice", "password": b"wrong"}, BAD_CREDENTIALS, V311_BAD_CREDENTIALS),
    ({"username": "alice"}, BAD_CREDENTIALS, V311_BAD_CREDENTIALS),
    ({"username": "mallory", "password": b"alice-pw"}, BAD_CREDENTIALS, V311_BAD_CREDENTIALS),
    ({}, NOT_AUTHORIZED, V311_NOT_AUTHORIZED),
], ids=["wrong-password", "no-password", "unknown-user", "no-credentials"])
@BOTH_VERSIONS
def test_refusal_codes_on_the_wire(raw, version, credentials, v5_reason, v311_code):
    r = raw(version=version, connect=False)
    connack = r.connect("refused", **credentials)
    if version == V5:
        assert connack.reason == v5_reason, connack
    else:
        # CONNACK, remaining length 2, session present 0, return code.
        assert connack.raw == bytes([0x20, 0x02, 0x00, v311_code])
    assert r.expect_closed() == []


@pytest.mark.allow_anonymous(True)
@BOTH_VERSIONS
def test_allow_anonymous_admits_clients_without_credentials_only(client, version):
    anonymous = client(version=version)
    assert anonymous.subscribe("anon/t", 1) == [1]
    client(version=version, **login("alice")).publish("anon/t", b"from alice", 1)
    assert anonymous.recv().payload == b"from alice"

    # A user name still has to come with its password, and must exist.
    for user, password in [("alice", "wrong"), ("mallory", "x")]:
        c = client(version=version, connect=False)
        code, _, _ = c.connect(expect_success=False, username=user, password=password)
        assert code == ReasonCode(PacketTypes.CONNACK, "Bad user name or password"), str(code)


@pytest.mark.password_file({"dave": "dave-pw", "erin": "erin-pw"}, tool="mosquitto_passwd")
@BOTH_VERSIONS
def test_mosquitto_passwd_file(broker, client, mosquitto_sub, version):
    entries = dict(line.split(":", 1) for line in broker.password_file.read_text().split())
    assert set(entries) == {"dave", "erin"}
    assert all(h.startswith("$7$") for h in entries.values()), entries

    dave = client(version=version, username="dave", password="dave-pw")
    assert dave.subscribe("m/t", 1) == [1]
    client(version=version, username="erin", password="erin-pw").publish("m/t", b"p", 1)
    assert dave.recv().payload == b"p"

    c = client(version=version, connect=False)
    code, _, _ = c.connect(expect_success=False, username="dave", password="erin-pw")
    assert code == ReasonCode(PacketTypes.CONNACK, "Bad user name or password"), str(code)

    v = "mqttv5" if version == V5 else "mqttv311"
    sub = mosquitto_sub("-V", v, "-u", "erin", "-P", "erin-pw", "-t", "m/cli", "-C", "1")
    sub.wait_for("received SUBACK")
    mosquitto_pub(broker.port, "-V", v, "-u", "dave", "-P", "dave-pw", "-t", "m/cli", "-m", "x")
    assert sub.messages(1) == ["m/cli|0|0|x"]
    assert sub.finish() == 0


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_clients_with_passwords(broker, mosquitto_sub, version):
    sub = mosquitto_sub("-V", version, "-u", "alice", "-P", "alice-pw", "-q", "1",
                        "-t", "cli/auth", "-C", "1")
    sub.wait_for("received SUBACK")
    mosquitto_pub(broker.port, "-V", version, "-u", "bob", "-P", "bob-pw", "-q", "1",
                  "-t", "cli/auth", "-m", "ok")
    assert sub.messages(1) == ["cli/auth|1|0|ok"]
    assert sub.finish() == 0

    # mosquitto_pub exits with the CONNACK code: the 3.1.1 return code or the v5 reason.
    v5 = version == "mqttv5"
    for args, code, message in [
        (["-u", "bob", "-P", "wrong"], 134 if v5 else 4, "bad user name or password"),
        (["-u", "mallory", "-P", "bob-pw"], 134 if v5 else 4, "bad user name or password"),
        ([], 135 if v5 else 5, "not authori"),
    ]:
        result = mosquitto_pub(broker.port, "-V", version, *args, "-t", "cli/auth", "-m", "no",
                               check=False)
        assert result.returncode == code, result
        assert message in result.stderr.decode().lower(), result

    refused = mosquitto_sub("-V", version, "-u", "alice", "-P", "wrong", "-t", "cli/auth")
    refused.wait_for("Connection error")
    assert refused.finish() != 0


def test_mqttd_passwd_delete_removes_a_user(broker, client):
    client(**login("bob"))

    mqttd_passwd(broker.password_file, "bob", delete=True)
    assert "bob:" not in broker.password_file.read_text()
    assert "alice:" in broker.password_file.read_text()
    # Removing someone who is not there fails and leaves the file alone.
    before = broker.password_file.read_text()
    result = mqttd_passwd(broker.password_file, "mallory", delete=True, check=False)
    assert result.returncode != 0
    assert "mallory" in result.stderr.decode()
    assert broker.password_file.read_text() == before

    assert broker.reload()
    c = client(connect=False)
    code, _, _ = c.connect(expect_success=False, **login("bob"))
    assert code.value == BAD_CREDENTIALS
    client(**login("alice"))


# --- SIGHUP reloads ------------------------------------------------------------------------


def connack_code(client, user: str, password: str, version: int = V5) -> int:
    c = client(version=version, connect=False)
    code, _, _ = c.connect(expect_success=False, username=user, password=password)
    c.stop()
    return code.value


def test_sighup_reloads_a_changed_password(broker, client, raw):
    before = client(**login("alice"))
    mqttd_passwd(broker.password_file, "alice", "alice-new")

    # Nothing changes until SIGHUP.
    assert connack_code(client, "alice", "alice-pw") == 0
    assert broker.reload()

    assert connack_code(client, "alice", "alice-new") == 0
    assert connack_code(client, "alice", "alice-pw") == BAD_CREDENTIALS
    assert connack_code(client, "alice", "alice-pw", V311) == BAD_CREDENTIALS  # paho's name for 4
    r = raw(version=V311, connect=False)
    assert r.connect("old", username="alice", password=b"alice-pw").raw == b"\x20\x02\x00\x04"
    # Other users are untouched.
    assert connack_code(client, "bob", "bob-pw") == 0
    # A connection made with the old password is not cut off by the reload.
    assert before.subscribe("reload/t", 0) == [0]


def test_sighup_with_a_broken_password_file_keeps_the_old_rules(broker, client):
    good = broker.password_file.read_text()
    broker.password_file.write_text(good + "this line is not user:hash\n")

    assert not broker.reload()
    assert broker.proc.poll() is None
    assert connack_code(client, "alice", "alice-pw") == 0
    assert connack_code(client, "bob", "bob-pw") == 0

    # An empty-hash entry is just as broken; the rules stay.
    broker.password_file.write_text("alice:\n")
    assert not broker.reload()
    assert connack_code(client, "alice", "alice-pw") == 0

    # Once the file is fixed, the next SIGHUP applies it.
    broker.password_file.write_text(good)
    mqttd_passwd(broker.password_file, "alice", "alice-new")
    assert broker.reload()
    assert connack_code(client, "alice", "alice-new") == 0
    assert connack_code(client, "alice", "alice-pw") == BAD_CREDENTIALS


@ACL
def test_sighup_with_a_broken_acl_file_changes_nothing(broker, client):
    mqttd_passwd(broker.password_file, "alice", "alice-new")
    broker.acl_file.write_text(broker.acl_file.read_text() + "topic bogus alice/#\n")

    assert not broker.reload()
    # Neither file took effect: the password change waits for a good reload too.
    assert connack_code(client, "alice", "alice-pw") == 0
    alice = client(**login("alice"))
    assert alice.subscribe("alice/#", 1) == [1]
    assert alice.subscribe("public/#", 1) == [NOT_AUTHORIZED]


@ACL
@BOTH_VERSIONS
def test_sighup_acl_change_applies_to_existing_subscriptions(broker, client, version):
    bob = client(version=version, **login("bob"))
    admin = client(**login("admin"))
    assert bob.subscribe("public/#", 1) == [1]
    admin.publish("public/news", b"before", 1)
    assert [m.payload for m in bob.collect_until_marker(admin)] == [b"before"]

    # Revoke bob's read access to public/#, grant him news/#.
    acl = broker.acl_file.read_text()
    bobs = "topic deny public/internal\ntopic read public/#\n"
    assert bobs in acl
    broker.acl_file.write_text(acl.replace(bobs, "topic read news/#\n"))
    assert broker.reload()

    admin.publish("public/news", b"after", 1)
    assert bob.collect_until_marker(admin) == []
    assert bob.subscribe("public/#", 1) == [sub_refused(version)]
    assert bob.subscribe("news/#", 1) == [1]


# --- ACLs ----------------------------------------------------------------------------------


@ACL
@BOTH_VERSIONS
def test_acl_read_write_and_readwrite(client, version):
    alice = client(version=version, **login("alice"))
    bob = client(version=version, **login("bob"))

    # inbox/bob: alice may only write, bob may only read.
    assert alice.subscribe("inbox/bob", 1) == [sub_refused(version)]
    assert bob.subscribe("inbox/bob", 1) == [1]
    assert alice.publish("inbox/bob", b"for bob", 1).value == 0
    assert bob.recv().payload == b"for bob"

    # alice/#: readwrite for alice, nothing for bob.
    assert alice.subscribe("alice/+", 1) == [1]
    assert alice.publish("alice/notes", b"mine", 1).value == 0
    assert alice.recv().payload == b"mine"
    assert bob.subscribe("alice/#", 1) == [sub_refused(version)]


@ACL
@BOTH_VERSIONS
def test_acl_denied_publish_is_acknowledged_but_not_delivered(client, version):
    bob = client(version=version, **login("bob"))
    admin = client(**login("admin"))
    assert admin.subscribe("#", 1) == [1]

    # bob may read inbox/bob but not write it.
    reason = bob.publish("inbox/bob", b"forged", 1)
    if version == V5:
        assert reason.value == NOT_AUTHORIZED, str(reason)
    else:
        assert reason.value == 0  # 3.1.1 has no way to refuse: a plain PUBACK
    # QoS 0 is dropped silently in both.
    bob.publish("inbox/bob", b"forged qos0", 0)

    assert admin.collect_until_marker(bob) == []
    assert bob.c.is_connected()


@ACL
@BOTH_VERSIONS
def test_acl_deny_wins_over_a_broader_grant(client, raw, version):
    alice = client(version=version, **login("alice"))
    admin = client(**login("admin"))

    # The filter lies within alice/# and only overlaps the denied topic: granted, but
    # alice/secret is not delivered through it.
    assert alice.subscribe("alice/#", 1) == [1]
    admin.publish("alice/secret", b"hidden", 1)
    admin.publish("alice/ok", b"visible", 1)
    assert [(m.topic, m.payload) for m in alice.collect_until_marker(admin)] == [
        ("alice/ok", b"visible")]

    # The denied topic itself cannot be subscribed to or published to.
    assert alice.subscribe("alice/secret", 1) == [sub_refused(version)]
    reason = alice.publish("alice/secret", b"x", 1)
    assert reason.value == (NOT_AUTHORIZED if version == V5 else 0)
    assert alice.collect_until_marker(alice) == []

    # One SUBSCRIBE, one reason code per filter.
    r = raw(version=version, username="alice", password=b"alice-pw")
    ack = r.subscribe([("alice/#", 1), ("alice/secret", 1), ("inbox/bob", 0),
                       ("users/alice/#", 2)])
    refused = sub_refused(version)
    assert ack.reasons == [1, refused, refused, 2]


@ACL
@BOTH_VERSIONS
def test_acl_deny_before_grant_filters_a_wildcard_subscription(client, version):
    bob = client(version=version, **login("bob"))
    admin = client(**login("admin"))
    assert bob.subscribe("public/#", 1) == [1]
    for topic in ["public/news", "public/internal", "public/internal/x", "public/weather"]:
        admin.publish(topic, topic.encode(), 1)
    got = [m.topic for m in bob.collect_until_marker(admin)]
    # `deny public/internal` is exact: public/internal/x is still readable.
    assert got == ["public/news", "public/internal/x", "public/weather"]


@ACL
@pytest.mark.allow_anonymous(True)
@BOTH_VERSIONS
def test_acl_anonymous_section(client, version):
    anonymous = client(version=version)
    admin = client(**login("admin"))
    bob = client(**login("bob"))

    assert anonymous.subscribe("public/#", 1) == [1]
    for topic_filter in ["#", "alice/#", "anon/out", "inbox/bob"]:
        assert anonymous.subscribe(topic_filter, 1) == [sub_refused(version)], topic_filter
    admin.publish("public/info", b"for everyone", 1)
    assert anonymous.recv().payload == b"for everyone"

    # Write-only anon/out reaches bob; read-only public/ and user topics do not.
    assert bob.subscribe("anon/#", 1) == [1]
    assert admin.subscribe("#", 1) == [1]
    assert anonymous.publish("anon/out", b"hello", 1).value == 0
    assert bob.recv().payload == b"hello"
    expected = NOT_AUTHORIZED if version == V5 else 0
    assert anonymous.publish("public/info", b"vandal", 1).value == expected
    assert anonymous.publish("alice/x", b"vandal", 1).value == expected
    got = admin.collect_until_marker(anonymous)
    assert [(m.topic, m.payload) for m in got] == [("anon/out", b"hello")]


@ACL
@BOTH_VERSIONS
def test_acl_user_without_a_section_gets_patterns_not_anonymous_rules(client, version):
    carol = client(version=version, **login("carol"))
    assert carol.subscribe("public/#", 1) == [sub_refused(version)]
    assert carol.subscribe("users/carol/#", 1) == [1]


@ACL
@BOTH_VERSIONS
def test_acl_pattern_with_user_name(client, version):
    alice = client(version=version, **login("alice"))
    bob = client(version=version, **login("bob"))

    assert alice.subscribe("users/alice/#", 1) == [1]
    assert bob.subscribe("users/bob/#", 1) == [1]
    assert alice.subscribe("users/bob/#", 1) == [sub_refused(version)]
    assert alice.subscribe("users/+/inbox", 1) == [sub_refused(version)]

    assert alice.publish("users/alice/status", b"own", 1).value == 0
    assert alice.recv().payload == b"own"
    reason = alice.publish("users/bob/status", b"forged", 1)
    assert reason.value == (NOT_AUTHORIZED if version == V5 else 0)
    bob.publish("users/bob/status", b"real", 1)
    assert [m.payload for m in bob.collect_until_marker(bob)] == [b"real"]


@ACL
@BOTH_VERSIONS
def test_acl_pattern_with_client_id(client, version):
    device = client("dev1", version=version, **login("carol"))
    admin = client(**login("admin"))
    assert admin.subscribe("devices/#", 1) == [1]

    # devices/dev1/status: write only; devices/dev1/cmd: read only; dev2 is someone else.
    assert device.subscribe("devices/dev1/cmd", 1) == [1]
    assert device.subscribe("devices/dev1/status", 1) == [sub_refused(version)]
    assert device.subscribe("devices/dev2/cmd", 1) == [sub_refused(version)]

    assert device.publish("devices/dev1/status", b"up", 1).value == 0
    expected = NOT_AUTHORIZED if version == V5 else 0
    assert device.publish("devices/dev2/status", b"spoofed", 1).value == expected
    assert device.publish("devices/dev1/cmd", b"self-command", 1).value == expected
    got = admin.collect_until_marker(device)
    assert [(m.topic, m.payload) for m in got] == [("devices/dev1/status", b"up")]

    admin.publish("devices/dev1/cmd", b"reboot", 1)
    assert device.recv().payload == b"reboot"

    # The same user under another client id gets that id's topics instead.
    other = client("dev2", version=version, **login("carol"))
    assert other.subscribe("devices/dev1/cmd", 1) == [sub_refused(version)]
    assert other.subscribe("devices/dev2/cmd", 1) == [1]


@ACL
@BOTH_VERSIONS
def test_acl_applies_to_retained_messages(client, version):
    admin = client(**login("admin"))
    for topic in ["alice/secret", "alice/ok"]:
        admin.publish(topic, topic.encode(), 1, retain=True)
    # The retained messages are stored (admin can read them back)...
    assert admin.subscribe("alice/+", 1) == [1]
    assert sorted(m.topic for m in admin.recv_n(2)) == ["alice/ok", "alice/secret"]

    # ...but a subscription that overlaps the denied topic gets only what it may read.
    alice = client(version=version, **login("alice"))
    assert alice.subscribe("alice/#", 1) == [1]
    got = alice.collect_until_marker(admin)
    assert [(m.topic, m.retain) for m in got] == [("alice/ok", True)]


@ACL
@BOTH_VERSIONS
def test_acl_applies_to_wills(client, version):
    admin = client(**login("admin"))
    assert admin.subscribe("#", 1) == [1]

    # A will on a topic the user may write is published...
    allowed = client(version=version, will=("users/carol/status", b"gone", 1, False, None),
                     **login("carol"))
    allowed.kill()
    assert admin.recv().topic == "users/carol/status"

    # ...one on a topic it may not write is refused at CONNECT, as Mosquitto does (3.1.1
    # return code 5, which paho reports as 0x87), rather than published later.
    forbidden = client(version=version, connect=False)
    code, _, _ = forbidden.connect(will=("alice/x", b"forged will", 1, False, None),
                                   expect_success=False, **login("carol"))
    assert code == ReasonCode(PacketTypes.CONNACK, "Not authorized"), str(code)
    forbidden.wait_disconnected()
    # Nothing could fence this: the will would come from the broker itself. Give it time.
    admin.assert_no_message(1.0)


@ACL
def test_acl_shared_subscriptions_and_sys(client):
    alice = client(**login("alice"))
    admin = client(**login("admin"))
    # The filter inside $share/<group>/ is what the ACL checks.
    assert alice.subscribe("$share/g/alice/#", 1) == [1]
    assert alice.subscribe("$share/g/inbox/bob", 1) == [NOT_AUTHORIZED]
    admin.publish("alice/secret", b"hidden", 1)
    admin.publish("alice/ok", b"visible", 1)
    assert [m.topic for m in alice.collect_until_marker(admin)] == ["alice/ok"]

    # `topic readwrite #` does not reach `$` topics, as in Mosquitto.
    assert admin.subscribe("$SYS/#", 0) == [NOT_AUTHORIZED]


@ACL
@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_acl_with_mosquitto_clients(broker, mosquitto_sub, version):
    v5 = version == "mqttv5"
    sub = mosquitto_sub("-V", version, "-u", "alice", "-P", "alice-pw", "-q", "1",
                        "-t", "alice/#", "-C", "1")
    sub.wait_for("received SUBACK")
    admin = ["-V", version, "-u", "admin", "-P", "admin-pw", "-q", "1"]
    # Each mosquitto_pub waits for its PUBACK before exiting, so the denied message would
    # have been routed before the allowed one.
    mosquitto_pub(broker.port, *admin, "-t", "alice/secret", "-m", "hidden")
    mosquitto_pub(broker.port, *admin, "-t", "alice/ok", "-m", "visible")
    assert sub.messages(1) == ["alice/ok|1|0|visible"]
    assert sub.finish() == 0

    denied = mosquitto_sub("-V", version, "-u", "alice", "-P", "alice-pw", "-t", "inbox/bob")
    denied.wait_for(f"Subscribed (mid: 1): {135 if v5 else 128}")
    denied.wait_for("All subscription requests were denied")
    denied.finish()

    watcher = mosquitto_sub("-V", version, "-u", "bob", "-P", "bob-pw", "-q", "1",
                            "-t", "inbox/bob", "-C", "1")
    watcher.wait_for("received SUBACK")
    result = mosquitto_pub(broker.port, "-V", version, "-u", "bob", "-P", "bob-pw", "-q", "1",
                           "-t", "inbox/bob", "-m", "forged", "-d")
    assert f"received PUBACK (Mid: 1, RC:{135 if v5 else 0})" in result.stdout.decode(), result
    if v5:
        assert "Publish 1 failed: Not authorized" in result.stderr.decode(), result
    mosquitto_pub(broker.port, "-V", version, "-u", "alice", "-P", "alice-pw", "-q", "1",
                  "-t", "inbox/bob", "-m", "real")
    assert watcher.messages(1) == ["inbox/bob|1|0|real"]
    assert watcher.finish() == 0


# --- SCRAM-SHA-256 enhanced authentication -------------------------------------------------


def test_scram_client_matches_rfc7677_example():
    """The test client itself, against the example exchange in RFC 7677 section 3."""
    c = ScramClient("user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    assert c.client_first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    final = c.client_final(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                           b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    assert final == (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                     b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    c.verify_server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    # What the signature check is for: a server that accepted the proof without knowing the
    # user's keys cannot produce `v=`.
    with pytest.raises(ScramError):
        c.verify_server_final(b"v=" + base64.b64encode(bytes(32)))
    with pytest.raises(ScramError):
        c.verify_server_final(b"e=invalid-proof")


def scram_first(r: mqttraw.RawClient, scram: ScramClient, client_id: str | None = None,
                method: str = MECHANISM) -> mqttraw.Packet:
    """Sends CONNECT with the authentication method and client-first; returns the answer."""
    props = {"AuthenticationMethod": method, "AuthenticationData": scram.client_first()}
    r.send(mqttraw.connect(client_id or f"s-{uuid.uuid4().hex[:12]}", version=V5, props=props))
    return r.recv()


def scram_continue(r: mqttraw.RawClient, scram: ScramClient, server_auth: mqttraw.Packet,
                   reason: int = 0x18) -> bytes:
    """Checks an AUTH 0x18 carrying server-first and answers it with client-final."""
    assert server_auth.type == AUTH and server_auth.reason == 0x18, server_auth
    assert server_auth.properties["AuthenticationMethod"] == MECHANISM
    final = scram.client_final(server_auth.properties["AuthenticationData"])
    r.send(mqttraw.auth(0x18, method=MECHANISM, data=final))
    return final


def scram_login(r: mqttraw.RawClient, user: str, password: str, **kwargs) -> mqttraw.Packet:
    """The whole exchange; returns the CONNACK, whose server-final has been verified."""
    scram = ScramClient(user, password)
    scram_continue(r, scram, scram_first(r, scram, **kwargs))
    connack = r.expect(CONNACK)
    assert connack.reason == 0, connack
    scram.verify_server_final(connack.properties["AuthenticationData"])
    return connack


@ACL
def test_scram_login(raw, client):
    r = raw(connect=False)
    scram = ScramClient("alice", "alice-pw")
    server_auth = scram_first(r, scram)
    scram_continue(r, scram, server_auth)
    # RFC 5802: the server nonce extends ours; mqttd's salts are 16 bytes, its count 10000.
    assert scram.server_nonce.startswith(scram.nonce)
    assert len(scram.salt) == 16 and scram.iterations == 10_000

    connack = r.expect(CONNACK)
    assert connack.reason == 0, connack
    assert connack.properties.get("AuthenticationMethod", MECHANISM) == MECHANISM
    scram.verify_server_final(connack.properties["AuthenticationData"])

    # The connection acts as alice (the ACL sees the SCRAM identity): her topics and
    # patterns, not the anonymous section.
    assert r.subscribe([("alice/#", 1), ("users/alice/#", 1), ("public/#", 1)]).reasons == [
        1, 1, NOT_AUTHORIZED]
    client(**login("admin")).publish("alice/hello", b"hi", 1)
    p = r.expect(PUBLISH)
    assert (p.topic, p.payload) == ("alice/hello", b"hi")


def test_scram_wrong_password(raw):
    r = raw(connect=False)
    scram = ScramClient("alice", "not-alice-pw")
    scram_continue(r, scram, scram_first(r, scram))
    connack = r.expect(CONNACK)
    assert connack.reason == BAD_CREDENTIALS, connack
    assert "AuthenticationData" not in connack.properties  # no server-final for a failure
    assert r.expect_closed() == []


def test_scram_unknown_user_looks_like_a_known_one(raw):
    def attempt(user: str, password: str):
        r = raw(connect=False)
        scram = ScramClient(user, password)
        server_auth = scram_first(r, scram)
        scram_continue(r, scram, server_auth)
        connack = r.expect(CONNACK)
        assert r.expect_closed() == []
        return server_auth, scram, connack

    known_auth, known, known_connack = attempt("alice", "wrong")
    unknown_auth, unknown, unknown_connack = attempt("mallory", "wrong")
    again_auth, again, _ = attempt("mallory", "wrong")
    other_auth, other, _ = attempt("trudy", "wrong")

    # The same packets, the same attributes, the same sizes, the same iteration count.
    assert unknown_connack.reason == BAD_CREDENTIALS
    assert unknown_connack.raw == known_connack.raw
    assert set(unknown_auth.properties) == set(known_auth.properties)
    attrs = lambda m: [part[:2] for part in m.split(b",")]  # noqa: E731
    assert attrs(unknown.server_first) == attrs(known.server_first) == [b"r=", b"s=", b"i="]
    assert len(unknown.server_nonce) == len(known.server_nonce)
    assert len(unknown.salt) == len(known.salt)
    assert unknown.iterations == known.iterations
    # A real user's salt does not change between attempts; a made-up one must not either,
    # and two made-up users get different salts, as two real ones do.
    assert again.salt == unknown.salt
    assert other.salt != unknown.salt
    assert attempt("alice", "x")[1].salt == known.salt


@pytest.mark.parametrize("method", ["SCRAM-SHA-1", "PLAIN", "scram-sha-256"])
def test_unknown_authentication_method(raw, method):
    r = raw(connect=False)
    answer = scram_first(r, ScramClient("alice", "alice-pw"), method=method)
    assert (answer.type, answer.reason) == (CONNACK, BAD_AUTH_METHOD), answer
    assert r.expect_closed() == []


@pytest.mark.password_file({"dave": "dave-pw"}, tool="mosquitto_passwd")
def test_scram_for_a_mosquitto_hash_fails_like_a_wrong_password(raw, client):
    # `$7$` entries hold no SCRAM keys: those users log in with a plain password only.
    r = raw(connect=False)
    scram = ScramClient("dave", "dave-pw")
    scram_continue(r, scram, scram_first(r, scram))
    assert r.expect(CONNACK).reason == BAD_CREDENTIALS
    client(username="dave", password="dave-pw")


def test_scram_reauthentication_keeps_the_subscription_flowing(raw, client):
    r = raw(connect=False)
    scram_login(r, "alice", "alice-pw")
    assert r.subscribe([("re/t", 1)]).reasons == [1]
    publisher = client(**login("bob"))
    received = []

    def take(packets):
        for p in packets:
            assert p.type == PUBLISH, p
            received.append(p.payload)
            r.puback(p.packet_id)

    publisher.publish("re/t", b"m1", 1)
    take([r.expect(PUBLISH)])
    for round_ in range(2):  # re-authentication can be repeated
        scram = ScramClient("alice", "alice-pw")
        r.send(mqttraw.auth(0x19, method=MECHANISM, data=scram.client_first()))
        publisher.publish("re/t", f"during-{round_}-a".encode(), 1)
        server_auth, between = r.expect_among(AUTH)
        take(between)
        scram_continue(r, scram, server_auth)
        publisher.publish("re/t", f"during-{round_}-b".encode(), 1)
        success, between = r.expect_among(AUTH)
        take(between)
        assert success.reason == 0x00, success
        assert success.properties["AuthenticationMethod"] == MECHANISM
        scram.verify_server_final(success.properties["AuthenticationData"])

    publisher.publish("re/t", b"after", 1)
    while b"after" not in received:
        take([r.expect(PUBLISH)])
    assert received == [b"m1", b"during-0-a", b"during-0-b", b"during-1-a", b"during-1-b",
                        b"after"]
    r.send(mqttraw.pingreq())
    assert r.expect(PINGRESP).type == PINGRESP


@pytest.mark.parametrize("user, password", [("alice", "wrong"), ("mallory", "alice-pw")],
                         ids=["wrong-password", "unknown-user"])
def test_scram_failed_reauthentication_disconnects(raw, client, user, password):
    r = raw(connect=False)
    scram_login(r, "alice", "alice-pw")
    assert r.subscribe([("re/t", 1)]).reasons == [1]

    scram = ScramClient(user, password)
    r.send(mqttraw.auth(0x19, method=MECHANISM, data=scram.client_first()))
    server_auth, between = r.expect_among(AUTH)
    assert between == []
    scram_continue(r, scram, server_auth)
    packets = r.expect_closed()
    assert [p.type for p in packets] == [DISCONNECT], packets
    # 0x86 does not exist in DISCONNECT; 0x87 Not authorized says what happened.
    assert packets[0].reason == NOT_AUTHORIZED, packets[0]

    # The session's subscription no longer delivers to this (closed) connection; a fresh
    # SCRAM login still works.
    r2 = raw(connect=False)
    scram_login(r2, "alice", "alice-pw")


def test_reauthentication_without_an_authentication_method_is_a_protocol_error(raw):
    r = raw(username="alice", password=b"alice-pw")
    scram = ScramClient("alice", "alice-pw")
    r.send(mqttraw.auth(0x19, method=MECHANISM, data=scram.client_first()))
    packets = r.expect_closed()
    assert [(p.type, p.reason) for p in packets] == [(DISCONNECT, 0x82)], packets


def test_reauthentication_with_another_method_is_a_protocol_error(raw):
    r = raw(connect=False)
    scram_login(r, "alice", "alice-pw")
    r.send(mqttraw.auth(0x19, method="SCRAM-SHA-1", data=b"n,,n=alice,r=abc"))
    packets = r.expect_closed()
    assert [(p.type, p.reason) for p in packets] == [(DISCONNECT, 0x82)], packets
