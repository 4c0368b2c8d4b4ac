//! MQTT over TLS against the real binary: the generated local CA, mutual TLS with the client
//! certificate's identity as the user name under an ACL, certificates reloaded on SIGHUP while
//! connections stay up, handshakes that never finish closed by `connect_timeout`, startup errors
//! that name the file, and Mosquitto's clients trusting the generated CA.
//!
//! Clients are tokio-rustls over TCP with the MQTT client of `mqttd-client`; certificates for
//! the tests are made with rcgen. Every wait ends as soon as its condition holds; deadlines only
//! catch a hang.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::ExtendedKeyUsagePurpose;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use mqttd_client::{Client, ConnectError, Events};
use mqttd_proto::client::ClientConfig;
use mqttd_proto::{QoS, ReasonCode};

use support::client::{filter, mqtt_config, next_payload, publish_acked, round_trip};
use support::pki::{
    assert_is_device_1, broker_serving, client_cert_broker, write, Leaf, TestCa, DEVICE_ACL,
};
use support::{within, Broker};

/// How long any one step may take: only a hang takes this long.
const STEP: Duration = Duration::from_secs(30);
const TLS_LISTENER: &str = "tls://127.0.0.1:0";

// ---------------------------------------------------------------------------------------------
// Certificates and clients
// ---------------------------------------------------------------------------------------------

/// A rustls client configuration trusting `ca_pem`, with a client certificate if given.
fn client_tls(ca_pem: &str, identity: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots);
    let config = match identity {
        Some(leaf) => {
            let chain = CertificateDer::pem_slice_iter(leaf.cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("client chain");
            let key = PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).expect("client key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client certificate")
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// Opens a TLS connection to `addr` asking for `name`.
async fn tls_connect(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(name.to_owned()).expect("server name");
    within(
        STEP,
        "TLS handshake",
        TlsConnector::from(config.clone()).connect(name, tcp),
    )
    .await
}

/// A TLS connection, then MQTT CONNECT over it.
async fn mqtt_over_tls(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    config: ClientConfig,
) -> Result<(Client, Events), String> {
    let stream = tls_connect(addr, tls, "localhost")
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    match within(STEP, "CONNACK", mqttd_client::connect(stream, config, None)).await {
        Ok((client, events, _)) => Ok((client, events)),
        Err(e) => Err(format!("MQTT: {e}")),
    }
}

/// The end-entity certificate the server presents on a new connection.
async fn served_certificate(addr: SocketAddr, tls: &Arc<rustls::ClientConfig>) -> Vec<u8> {
    let stream = tls_connect(addr, tls, "localhost")
        .await
        .expect("TLS connection");
    let chain = stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("server chain");
    chain[0].as_ref().to_vec()
}

/// Publishes `payload` to `to` at QoS 1 from `publisher`, which the broker must accept, and
/// reads it on `subscriber`'s events.
async fn relay(
    publisher: &Client,
    publisher_events: &mut Events,
    subscriber: &mut Events,
    to: &str,
    payload: &str,
) {
    assert_eq!(
        publish_acked(publisher, publisher_events, to, payload).await,
        ReasonCode::Success
    );
    assert_eq!(next_payload(subscriber).await, payload);
}

/// Waits until the broker's counter `name` reaches `value`, and checks it did not pass it.
async fn expect_metric(broker: &Broker, name: &str, value: f64) {
    let metrics = broker
        .wait_for_metrics(STEP, |m| m.get(name) >= value)
        .await;
    assert_eq!(metrics.get(name), value, "{name}");
}

/// The CA the broker generated under its data directory, PEM.
fn generated_ca(broker: &Broker) -> String {
    std::fs::read_to_string(broker.data_dir().join("tls").join("ca.pem")).expect("ca.pem")
}

/// The bytes of a real ClientHello for `localhost` from `tls`.
fn client_hello(tls: &Arc<rustls::ClientConfig>) -> Vec<u8> {
    let mut hello = Vec::new();
    rustls::ClientConnection::new(
        tls.clone(),
        ServerName::try_from("localhost").expect("name"),
    )
    .expect("client connection")
    .write_tls(&mut hello)
    .expect("ClientHello");
    hello
}

fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("certificate PEM")
        .as_ref()
        .to_vec()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// With no certificate configured the broker makes a local CA and a server certificate; a
/// client trusting that CA publishes and subscribes over TLS, a client trusting another CA is
/// refused, and a restart reuses the same CA.
#[tokio::test]
async fn generated_ca_serves_tls_and_is_reused() {
    let mut broker = Broker::start_with("", &[TLS_LISTENER]);
    let dir = broker.data_dir().join("tls");
    let ca = std::fs::read_to_string(dir.join("ca.pem")).expect("generated ca.pem");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700, "tls directory");
        assert_eq!(mode(&dir.join("ca-key.pem")), 0o600, "CA key");
        assert_eq!(mode(&dir.join("key.pem")), 0o600, "server key");
    }
    let trusted = client_tls(&ca, None);

    let (sub, mut sub_events) = mqtt_over_tls(broker.tls, &trusted, mqtt_config("sub", None))
        .await
        .expect("subscriber over TLS");
    let ack = sub
        .subscribe_one(filter("tls/#"), QoS::AtLeastOnce)
        .await
        .expect("SUBACK");
    assert_eq!(ack.reasons, vec![ReasonCode::GrantedQoS1]);
    let (publ, mut pub_events) = mqtt_over_tls(broker.tls, &trusted, mqtt_config("pub", None))
        .await
        .expect("publisher over TLS");
    relay(&publ, &mut pub_events, &mut sub_events, "tls/a", "over tls").await;

    // By IP address too: the certificate names 127.0.0.1.
    let by_ip = tls_connect(broker.tls, &trusted, "127.0.0.1").await;
    assert!(by_ip.is_ok(), "TLS by IP address: {:?}", by_ip.err());

    let stranger = client_tls(&TestCa::new("some other CA").pem, None);
    let refused = tls_connect(broker.tls, &stranger, "localhost").await;
    assert!(
        refused.is_err(),
        "a client trusting another CA must refuse the broker"
    );
    expect_metric(&broker, "mqttd_tls_handshake_failures_total", 1.0).await;

    drop((sub, publ));
    broker.shutdown();
    broker.restart();
    let again = std::fs::read_to_string(dir.join("ca.pem")).expect("ca.pem after restart");
    assert_eq!(again, ca, "the CA is reused across restarts");
    let (client, _events) = mqtt_over_tls(broker.tls, &trusted, mqtt_config("again", None))
        .await
        .expect("the same CA is trusted after a restart");
    drop(client);
    let log = broker.log_text();
    assert!(!log.contains("ERROR"), "{log}");
}

/// Whether Mosquitto's clients are installed; says so when they are not.
fn have_mosquitto_clients() -> bool {
    let have = |tool: &str| Command::new(tool).arg("--help").output().is_ok();
    if have("mosquitto_pub") && have("mosquitto_sub") {
        return true;
    }
    eprintln!(
        "SKIPPED: mosquitto_pub/mosquitto_sub not installed (apt-get install mosquitto-clients)"
    );
    false
}

/// Asserts that the client `what` succeeded, showing its error and the broker's log otherwise.
#[track_caller]
fn assert_ran(out: &std::process::Output, what: &str, broker: &Broker) {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        broker.log_tail()
    );
}

/// Runs a Mosquitto client to completion off the runtime's workers.
async fn run_tool(mut cmd: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output().expect("run a mosquitto client"))
        .await
        .expect("mosquitto client task")
}

/// `mosquitto_pub` and `mosquitto_sub` with `--cafile <data_dir>/tls/ca.pem`.
#[tokio::test]
async fn mosquitto_clients_trust_the_generated_ca() {
    if !have_mosquitto_clients() {
        return;
    }
    let broker = Broker::start_with("", &[TLS_LISTENER]);
    let ca = broker.data_dir().join("tls").join("ca.pem");
    let port = broker.tls.port().to_string();
    let tool = |name: &str, args: &[&str]| {
        let mut cmd = Command::new(name);
        cmd.args(["-h", "localhost", "-p", &port, "-V", "mqttv311", "--cafile"])
            .arg(&ca)
            .args(["-t", "mosq/tls"])
            .args(args);
        cmd
    };
    // A retained message, so that the subscriber gets it whenever it subscribes.
    let published = run_tool(tool(
        "mosquitto_pub",
        &["-m", "hello over tls", "-q", "1", "-r"],
    ))
    .await;
    assert_ran(&published, "mosquitto_pub", &broker);
    let received = run_tool(tool("mosquitto_sub", &["-C", "1", "-W", "30"])).await;
    assert_ran(&received, "mosquitto_sub", &broker);
    assert_eq!(
        String::from_utf8_lossy(&received.stdout).trim(),
        "hello over tls"
    );
}

/// Mosquitto's clients with a client certificate (OpenSSL on the client side): with
/// `--cert`/`--key` the certificate's CN is the user name the ACL grants a topic to; without
/// them the handshake is refused.
#[tokio::test]
async fn mosquitto_clients_with_a_client_certificate() {
    if !have_mosquitto_clients() {
        return;
    }
    let clients_ca = TestCa::new("test clients CA");
    let (broker, root) = client_cert_broker(
        &clients_ca,
        "user device-9\ntopic readwrite fleet/device-9/#\n",
        TLS_LISTENER,
        true,
    );
    let (cert, key) = clients_ca.client("device-9").write_to(&root, "device-9");
    let server_ca = broker.data_dir().join("tls").join("ca.pem");
    let port = broker.tls.port().to_string();
    let tool = |name: &str, with_cert: bool, args: &[&str]| {
        let mut cmd = Command::new(name);
        cmd.args(["-h", "localhost", "-p", &port, "-V", "mqttv311", "--cafile"])
            .arg(&server_ca)
            .args(["-t", "fleet/device-9/state", "-q", "1"])
            .args(args);
        if with_cert {
            cmd.arg("--cert").arg(&cert).arg("--key").arg(&key);
        }
        cmd
    };
    let published = run_tool(tool("mosquitto_pub", true, &["-m", "online", "-r"])).await;
    assert_ran(&published, "mosquitto_pub with a certificate", &broker);
    let received = run_tool(tool("mosquitto_sub", true, &["-C", "1", "-W", "30"])).await;
    assert_ran(&received, "mosquitto_sub with a certificate", &broker);
    assert_eq!(String::from_utf8_lossy(&received.stdout).trim(), "online");

    let refused = run_tool(tool("mosquitto_pub", false, &["-m", "anonymous"])).await;
    assert!(
        !refused.status.success(),
        "mosquitto_pub without a certificate got in"
    );
}

/// Mutual TLS: with `require_client_cert` and `use_identity_as_username`, the client
/// certificate's CN is the user name the ACL applies to, whatever CONNECT says; a client
/// without a certificate, or with one from another CA, does not get in.
#[tokio::test]
async fn client_certificate_identity_is_the_user_name() {
    let clients_ca = TestCa::new("test clients CA");
    let (broker, _) = client_cert_broker(&clients_ca, DEVICE_ACL, TLS_LISTENER, true);
    let server_ca = generated_ca(&broker);

    // The CONNECT claims to be admin; the certificate says device-1, and device-1 it is.
    let device = clients_ca.client("device-1");
    let tls = client_tls(&server_ca, Some(&device));
    let (client, mut events) = mqtt_over_tls(broker.tls, &tls, mqtt_config("d1", Some("admin")))
        .await
        .expect("device-1 connects with its certificate");
    assert_is_device_1(&client, &mut events).await;

    // No certificate: refused in the handshake (in TLS 1.3 the client learns it on its first
    // read, so the refusal may come as the MQTT connection failing).
    let anonymous = client_tls(&server_ca, None);
    let outcome = mqtt_over_tls(broker.tls, &anonymous, mqtt_config("anon", None)).await;
    assert!(outcome.is_err(), "a client without a certificate got in");

    // A certificate from another CA: refused the same way.
    let forged = TestCa::new("test clients CA").client("device-1");
    let outcome = mqtt_over_tls(
        broker.tls,
        &client_tls(&server_ca, Some(&forged)),
        mqtt_config("forged", None),
    )
    .await;
    assert!(outcome.is_err(), "a certificate from another CA got in");
    expect_metric(&broker, "mqttd_tls_handshake_failures_total", 2.0).await;

    // device-1 is still connected and working.
    round_trip(&client, &mut events, "devices/device-1/temp", "22").await;
}

/// Without `require_client_cert`, a client without a certificate gets in with no user name (so
/// the ACL's anonymous rules apply to it), while one with a certificate is its CN.
#[tokio::test]
async fn optional_client_certificate_leaves_others_anonymous() {
    let clients_ca = TestCa::new("test clients CA");
    let (broker, _) = client_cert_broker(
        &clients_ca,
        "topic read public/#\n\nuser sensor-7\ntopic readwrite sensors/7/#\n",
        TLS_LISTENER,
        false,
    );
    let server_ca = generated_ca(&broker);

    let (anon, _events) = mqtt_over_tls(
        broker.tls,
        &client_tls(&server_ca, None),
        mqtt_config("anon", Some("sensor-7")),
    )
    .await
    .expect("anonymous client connects");
    let acks = [
        anon.subscribe_one(filter("public/#"), QoS::AtMostOnce)
            .await,
        anon.subscribe_one(filter("sensors/7/#"), QoS::AtMostOnce)
            .await,
    ];
    let reasons: Vec<_> = acks
        .into_iter()
        .map(|a| a.expect("SUBACK").reasons[0])
        .collect();
    // The user name in CONNECT counts for nothing: it is anonymous.
    assert_eq!(reasons, [ReasonCode::Success, ReasonCode::NotAuthorized]);

    let (sensor, _events) = mqtt_over_tls(
        broker.tls,
        &client_tls(&server_ca, Some(&clients_ca.client("sensor-7"))),
        mqtt_config("s7", None),
    )
    .await
    .expect("sensor-7 connects");
    let ack = sensor
        .subscribe_one(filter("sensors/7/#"), QoS::AtMostOnce)
        .await
        .expect("SUBACK");
    assert_eq!(ack.reasons, vec![ReasonCode::Success]);
}

/// A server certificate past its end: the broker serves it (with a warning), the client
/// refuses it.
#[tokio::test]
async fn expired_server_certificate_is_refused_by_the_client() {
    let ca = TestCa::new("test server CA");
    let expired = ca.leaf(
        "expired",
        &["localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
        Some((2020, 2021)),
    );
    let (broker, _, _) = broker_serving(&expired, TLS_LISTENER);
    let error = tls_connect(broker.tls, &client_tls(&ca.pem, None), "localhost")
        .await
        .expect_err("an expired certificate must be refused");
    assert!(
        error.to_string().to_lowercase().contains("expired"),
        "unexpected error: {error}"
    );
    assert!(
        broker.log_text().contains("expired"),
        "no warning about the expired certificate\n{}",
        broker.log_tail()
    );
}

/// SIGHUP reloads the certificate and key: new connections get the new certificate while a
/// connection made before keeps working; a broken key on disk leaves the previous ones in use.
#[tokio::test]
async fn sighup_reloads_certificates_and_keeps_connections() {
    let ca = TestCa::new("test server CA");
    let first = ca.server("server-1");
    let (broker, cert, key) = broker_serving(&first, TLS_LISTENER);
    let tls = client_tls(&ca.pem, None);
    assert_eq!(
        served_certificate(broker.tls, &tls).await,
        der_of(&first.cert)
    );

    let (old, mut old_events) = mqtt_over_tls(broker.tls, &tls, mqtt_config("old", None))
        .await
        .expect("connection before the reload");
    old.subscribe_one(filter("reload/#"), QoS::AtLeastOnce)
        .await
        .expect("SUBACK");

    let second = ca.server("server-2");
    write(&key, &second.key);
    write(&cert, &second.cert);
    broker.hangup();
    let deadline = Instant::now() + STEP;
    loop {
        if served_certificate(broker.tls, &tls).await == der_of(&second.cert) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate is not served after SIGHUP\n{}",
            broker.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The connection from before the reload is up and works both ways.
    let (new, mut new_events) = mqtt_over_tls(broker.tls, &tls, mqtt_config("new", None))
        .await
        .expect("connection after the reload");
    relay(
        &new,
        &mut new_events,
        &mut old_events,
        "reload/a",
        "after reload",
    )
    .await;
    round_trip(&old, &mut old_events, "reload/b", "from the old one").await;

    // A broken key: the reload fails, names the file, and the certificate in use stays.
    write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nbm9wZQ==\n-----END PRIVATE KEY-----\n",
    );
    broker.hangup();
    let deadline = Instant::now() + STEP;
    while !broker
        .log_text()
        .contains("reload failed, the previous configuration stays: tls")
    {
        assert!(
            Instant::now() < deadline,
            "no reload failure logged\n{}",
            broker.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = broker.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("reload failed, the previous configuration stays: tls"))
        .expect("the failure line");
    assert!(
        line.contains("server-key.pem"),
        "the line names the key file: {line}"
    );
    assert_eq!(
        served_certificate(broker.tls, &tls).await,
        der_of(&second.cert)
    );
    round_trip(&old, &mut old_events, "reload/c", "still up").await;
}

/// 500 sockets that send nothing, and 100 that trickle a ClientHello a byte at a time, are
/// closed once `connect_timeout` has passed since they connected, while a client that
/// completed its handshake meanwhile keeps working.
#[tokio::test]
async fn slow_handshakes_are_closed_by_connect_timeout() {
    const SILENT: usize = 500;
    const TRICKLING: usize = 100;
    let broker = Broker::start_with("connect_timeout = 1\n", &[TLS_LISTENER]);
    let ca = generated_ca(&broker);
    let tls = client_tls(&ca, None);

    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        silent.push(TcpStream::connect(broker.tls).await.expect("connect"));
    }
    // The first bytes of a real ClientHello, sent one every 100 ms: 3 s for 30 bytes.
    let hello = client_hello(&tls);
    let tricklers: Vec<_> = (0..TRICKLING)
        .map(|_| {
            let addr = broker.tls;
            let hello = hello.clone();
            tokio::spawn(async move {
                // Timed from before the connection: the broker's deadline runs from when it
                // accepted it, which is later.
                let started = Instant::now();
                let mut stream = TcpStream::connect(addr).await.expect("connect");
                for byte in hello.iter().take(200) {
                    if stream.write_all(&[*byte]).await.is_err() {
                        return started.elapsed();
                    }
                    let mut buf = [0u8; 64];
                    let read =
                        tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf))
                            .await;
                    if let Ok(Ok(0) | Err(_)) = read {
                        return started.elapsed();
                    }
                }
                panic!("a trickling client was not closed within 200 bytes");
            })
        })
        .collect();

    // A witness completes its handshake while the others are pending, and works.
    let (witness, mut events) = mqtt_over_tls(broker.tls, &tls, mqtt_config("witness", None))
        .await
        .expect("the witness connects");
    witness
        .subscribe_one(filter("witness/#"), QoS::AtLeastOnce)
        .await
        .expect("SUBACK");
    round_trip(&witness, &mut events, "witness/a", "one").await;

    for (i, mut socket) in silent.into_iter().enumerate() {
        let mut buf = [0u8; 64];
        let read = within(STEP, "a silent socket closed", socket.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "silent socket {i}: expected a close, got {read:?}"
        );
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed before connect_timeout: {:?}",
        started.elapsed()
    );
    for trickler in tricklers {
        let trickled_for = within(STEP, "a trickler closed", trickler)
            .await
            .expect("trickler task");
        assert!(
            // The deadline is 1 s; the margin only absorbs timer rounding, while a broker that
            // closed on the first bytes instead would be far below it.
            trickled_for >= Duration::from_millis(900),
            "trickler closed after {trickled_for:?}"
        );
    }

    expect_metric(
        &broker,
        "mqttd_tls_handshake_timeouts_total",
        (SILENT + TRICKLING) as f64,
    )
    .await;
    round_trip(&witness, &mut events, "witness/b", "two").await;
}

/// Startup fails, naming the listener and the file, for a key that does not match the
/// certificate, a key file that cannot be read, a certificate file that is not PEM, and a TLS
/// port that is taken.
#[tokio::test]
async fn startup_errors_name_the_listener_and_the_file() {
    let ca = TestCa::new("test server CA");
    let a = ca.server("a");
    let b = ca.server("b");
    // (case, certificate file and its text, key file and its text (none: absent), the file
    // the message must name)
    let cases = [
        (
            "mismatched key",
            ("server.pem", &a.cert[..]),
            ("other-key.pem", Some(&b.key[..])),
            "other-key.pem",
        ),
        (
            "missing key",
            ("server.pem", &a.cert[..]),
            ("absent-key.pem", None),
            "absent-key.pem",
        ),
        (
            "not PEM",
            ("garbage.pem", "this is not a certificate\n"),
            ("server-key.pem", Some(&a.key[..])),
            "garbage.pem",
        ),
    ];
    for (what, (cert_name, cert_text), (key_name, key_text), file) in cases {
        let mut broker = Broker::configured("", &[TLS_LISTENER]);
        let root = broker.root().to_owned();
        let cert = write(&root.join(cert_name), cert_text);
        let key = root.join(key_name);
        if let Some(text) = key_text {
            write(&key, text);
        }
        write(
            &root.join("mqttd.toml"),
            &format!("[tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n"),
        );
        let failure = broker
            .try_restart()
            .err()
            .unwrap_or_else(|| panic!("{what}: the broker started"));
        assert!(!failure.status.success(), "{what}: {failure}");
        assert!(
            failure.stderr.contains(TLS_LISTENER),
            "{what}: no listener in {failure}"
        );
        assert!(
            failure.stderr.contains(file),
            "{what}: no {file} in {failure}"
        );
    }

    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let url = format!("tls://{}", taken.local_addr().expect("address"));
    let mut broker = Broker::configured("", &[&url]);
    let failure = broker
        .try_restart()
        .expect_err("the broker started on a taken port");
    assert!(failure.stderr.contains(&url), "no listener in {failure}");
}

/// Connecting with the wrong expectations: a plain MQTT client on the TLS port is refused in
/// the handshake and counted, and does not disturb the listener.
#[tokio::test]
async fn plain_mqtt_on_the_tls_port_is_refused() {
    let broker = Broker::start_with("", &[TLS_LISTENER]);
    let outcome = within(
        STEP,
        "plain MQTT on the TLS port",
        mqttd_client::connect_tcp(broker.tls, mqtt_config("plain", None), None),
    )
    .await;
    assert!(
        matches!(outcome, Err(ConnectError::Closed(_) | ConnectError::Io(_))),
        "plain MQTT on the TLS port: {:?}",
        outcome.map(|_| ())
    );
    expect_metric(&broker, "mqttd_tls_handshake_failures_total", 1.0).await;
    let ca = generated_ca(&broker);
    let (client, _events) =
        mqtt_over_tls(broker.tls, &client_tls(&ca, None), mqtt_config("ok", None))
            .await
            .expect("a TLS client after the plain one");
    drop(client);
}

/// What a pending handshake holds: 1,000 clients that sent the first bytes of a ClientHello and
/// stopped cost the broker less than 32 KiB each; about 5.4 KB measured, allocator included
/// (the connection task, rustls' state, and the part of the record received in a buffer of
/// its size; 17 KiB with tokio-rustls, whose read buffer is 4 KiB at least).
#[tokio::test]
async fn a_pending_handshake_holds_little() {
    const WARM_UP: usize = 200;
    const PENDING: usize = 1000;
    const PER_HANDSHAKE: u64 = 32 * 1024;
    let broker = Broker::start_with("connect_timeout = 120\n", &[TLS_LISTENER]);
    let ca = generated_ca(&broker);
    let tls = client_tls(&ca, None);
    let hello = client_hello(&tls);
    // The record header and the start of the ClientHello: rustls must buffer it and wait.
    let partial = &hello[..hello.len() / 2];

    // Each round ends with a client that completes its handshake and a round trip, after the
    // pending ones have sent their bytes: the broker has taken them in by then.
    let (witness, mut events) = mqtt_over_tls(broker.tls, &tls, mqtt_config("witness", None))
        .await
        .expect("the witness connects");
    witness
        .subscribe_one(filter("fence/#"), QoS::AtLeastOnce)
        .await
        .expect("SUBACK");
    let mut held = Vec::new();
    hold_pending(broker.tls, partial, WARM_UP, &mut held).await;
    round_trip(&witness, &mut events, "fence/1", "1").await;
    let before = broker.rss();
    hold_pending(broker.tls, partial, PENDING, &mut held).await;
    round_trip(&witness, &mut events, "fence/2", "2").await;
    expect_metric(
        &broker,
        "mqttd_connections_accepted_total",
        (WARM_UP + PENDING + 1) as f64,
    )
    .await;
    let after = broker.rss();
    let per = after.saturating_sub(before) / PENDING as u64;
    eprintln!("pending handshake: {per} B");
    assert!(
        per < PER_HANDSHAKE,
        "{per} bytes per pending handshake ({before} -> {after} bytes resident)"
    );
    drop(held);
}

/// Opens `n` connections to `addr` that each send `partial` and wait; keeps them in `held`.
async fn hold_pending(addr: SocketAddr, partial: &[u8], n: usize, held: &mut Vec<TcpStream>) {
    for _ in 0..n {
        let mut socket = TcpStream::connect(addr).await.expect("connect");
        socket
            .write_all(partial)
            .await
            .expect("partial ClientHello");
        held.push(socket);
    }
}

/// `mqttd pub` and `mqttd sub` reach the broker's own TLS-based listeners, `mqtts://` and
/// `wss://`, trusting the generated CA: a retained message published over one transport is
/// read over the other, and a client trusting no CA is refused with the TLS exit status.
#[tokio::test]
async fn mqttd_clients_over_mqtts_and_wss_trusting_the_generated_ca() {
    let mut broker = Broker::start_with("", &[TLS_LISTENER, "wss://127.0.0.1:0"]);
    let ca = broker.data_dir().join("tls").join("ca.pem");
    let mqtts = format!("mqtts://localhost:{}", broker.tls.port());
    let wss = format!("wss://localhost:{}/mqtt", broker.wss.port());
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_mqttd"))
            .args(args)
            .output()
            .expect("run mqttd")
    };
    let ca_arg = ca.to_str().expect("UTF-8 path");

    // Published over WSS, read over TLS, and the other way round.
    for (publish_on, read_on, payload) in [(&wss, &mqtts, "via wss"), (&mqtts, &wss, "via tls")] {
        let topic = format!("cli/{}", payload.replace(' ', "-"));
        let published = cli(&[
            "pub", "-L", publish_on, "--cafile", ca_arg, "-t", &topic, "-m", payload, "-r", "-q",
            "1",
        ]);
        assert!(
            published.status.success(),
            "pub over {publish_on}: {}",
            String::from_utf8_lossy(&published.stderr)
        );
        let read = cli(&[
            "sub", "-L", read_on, "--cafile", ca_arg, "-t", &topic, "-C", "1", "-W", "30", "-v",
        ]);
        assert!(
            read.status.success(),
            "sub over {read_on}: {}",
            String::from_utf8_lossy(&read.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&read.stdout),
            format!("{topic} {payload}\n")
        );
    }

    // Without the CA the client refuses the broker's certificate: exit status 4 (TLS).
    let untrusting = tempfile::tempdir().expect("temporary directory");
    let other_ca = untrusting.path().join("other-ca.pem");
    std::fs::write(&other_ca, TestCa::new("another CA").pem).expect("write CA");
    let refused = cli(&[
        "pub",
        "-L",
        &wss,
        "--cafile",
        other_ca.to_str().expect("UTF-8 path"),
        "-t",
        "x",
        "-m",
        "x",
    ]);
    assert_eq!(refused.status.code(), Some(4), "{:?}", refused);
    broker.shutdown();
}

/// Idle connections over TLS cost little more than idle TCP connections do: a connection
/// with nothing to read or write holds no TLS buffers (rustls' unbuffered API, with buffers
/// the broker releases), only rustls' state and keys. Measured: about 8.5 KB against 3.9 KB
/// over TCP (debug build; 9.5 KB against 5.5 KB before idle TCP connections got cheaper;
/// 18.8 KB with tokio-rustls).
#[tokio::test]
async fn an_idle_tls_connection_costs_little_more_than_a_tcp_one() {
    const N: usize = 400;
    /// Most bytes an idle TLS connection may hold beyond a TCP one.
    const TLS_EXTRA: u64 = 5_500;
    let broker = Broker::start_with("", &[TLS_LISTENER]);
    let ca = generated_ca(&broker);
    let tls = client_tls(&ca, None);
    let tcp_client = |i: usize| {
        let addr = broker.mqtt;
        async move {
            let stream = TcpStream::connect(addr).await.expect("connect");
            let config = mqtt_config(&format!("tcp-{i}"), None);
            let (client, events, _) =
                within(STEP, "CONNACK", mqttd_client::connect(stream, config, None))
                    .await
                    .expect("TCP client");
            (client, events)
        }
    };
    // Warm up: the runtime and allocator reach their working size.
    let mut warm = Vec::new();
    for i in 0..50 {
        warm.push(tcp_client(10_000 + i).await);
        warm.push(
            mqtt_over_tls(broker.tls, &tls, mqtt_config(&format!("w-{i}"), None))
                .await
                .expect("TLS client"),
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = broker.rss();
    let mut tcp = Vec::new();
    for i in 0..N {
        tcp.push(tcp_client(i).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let with_tcp = broker.rss();
    let mut over_tls = Vec::new();
    for i in 0..N {
        over_tls.push(
            mqtt_over_tls(broker.tls, &tls, mqtt_config(&format!("tls-{i}"), None))
                .await
                .expect("TLS client"),
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let with_tls = broker.rss();
    let per_tcp = with_tcp.saturating_sub(base) / N as u64;
    let per_tls = with_tls.saturating_sub(with_tcp) / N as u64;
    eprintln!("idle connection: tcp {per_tcp} B, tls {per_tls} B");
    assert!(per_tcp > 0, "{N} TCP connections cost nothing?");
    // Once twice the TCP figure; since a TCP connection got cheaper (see
    // `tests/idle_memory.rs`), the bound is on what TLS adds: rustls' connection state and
    // keys, about 4,500 B in a debug build.
    assert!(
        per_tls <= per_tcp + TLS_EXTRA,
        "an idle TLS connection holds {per_tls} B, a TCP one {per_tcp} B (allowed {TLS_EXTRA} B more)"
    );
    drop((warm, tcp, over_tls));
}
