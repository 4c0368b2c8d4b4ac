//! MQTT over QUIC against the real binary: it prints its `quic://` listener, serves it with the
//! CA it generated, and on SIGHUP gives new QUIC connections the new certificate while one made
//! before keeps working. At disconnect it logs the connection's QUIC statistics. Mutual TLS
//! over QUIC: a client certificate's identity is the user name, as over TLS, and a client
//! without one, or with one from another CA, is refused.
//!
//! Clients are noq with the MQTT client of `mqttd-client` over one stream, or for mutual TLS
//! the QUIC transport of `mqttd-client` with a client certificate.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use noq::crypto::rustls::QuicClientConfig;
use noq::Endpoint;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use mqttd_client::transport::TlsError;
use mqttd_client::{
    connect_to, Client, ConnectError, Connector, Events, Transport, TransportError,
};
use mqttd_proto::client::ClientConfig;
use mqttd_proto::{ClientId, QoS, ReasonCode};

use support::client::{filter, mqtt_config, round_trip};
use support::pki::{
    assert_is_device_1, broker_serving, client_cert_broker, write, TestCa, DEVICE_ACL,
};
use support::{within, Broker};

/// How long any one step may take: only a hang takes this long.
const STEP: Duration = Duration::from_secs(30);
const QUIC_LISTENER: &str = "quic://127.0.0.1:0";

/// A client endpoint trusting the CA certificates in `ca_pem`, offering ALPN `mqtt`.
fn endpoint(ca_pem: &[u8]) -> Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.expect("CA PEM")).expect("CA certificate");
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"mqtt".to_vec()];
    let crypto = QuicClientConfig::try_from(tls).expect("QUIC client config");
    let endpoint = Endpoint::client("127.0.0.1:0".parse().expect("address")).expect("UDP socket");
    endpoint.set_default_client_config(noq::ClientConfig::new(Arc::new(crypto)));
    endpoint
}

/// MQTT over one QUIC stream to `addr`; the error if the handshake fails.
async fn mqtt_over_quic(
    endpoint: &Endpoint,
    addr: SocketAddr,
    client_id: &str,
) -> Result<(Client, Events, noq::Connection), noq::ConnectionError> {
    let conn = within(
        STEP,
        "QUIC handshake",
        endpoint.connect(addr, "localhost").expect("connect"),
    )
    .await?;
    let (send, recv) = conn.open_bi().await.expect("a stream");
    let config = ClientConfig::new(ClientId::try_from(client_id).expect("client id"));
    let (client, events, _) = mqttd_client::connect(tokio::io::join(recv, send), config, None)
        .await
        .expect("CONNACK");
    Ok((client, events, conn))
}

/// Subscribes to `topic`, then publishes to it and reads the message back.
async fn echo(client: &Client, events: &mut Events, topic: &str) {
    client
        .subscribe_one(filter(topic), QoS::AtLeastOnce)
        .await
        .expect("SUBACK");
    round_trip(client, events, topic, "ping").await;
}

/// The broker's generated CA, PEM.
fn generated_ca(broker: &Broker) -> Vec<u8> {
    std::fs::read(broker.data_dir().join("tls/ca.pem")).expect("generated CA")
}

#[tokio::test]
async fn mqttd_prints_its_quic_listener_and_serves_it_with_the_generated_ca() {
    let broker = Broker::start_with("", &[QUIC_LISTENER]);
    assert_ne!(broker.quic.port(), 0);
    let (client, mut events, _conn) =
        mqtt_over_quic(&endpoint(&generated_ca(&broker)), broker.quic, "q")
            .await
            .expect("handshake with the generated CA");
    echo(&client, &mut events, "quic/echo").await;
}

#[tokio::test]
async fn sighup_gives_quic_connections_the_new_certificate() {
    let (first_ca, second_ca) = (TestCa::new("first CA"), TestCa::new("second CA"));
    let (broker, cert, key) = broker_serving(&first_ca.server("localhost"), QUIC_LISTENER);
    let (old, mut old_events, _old_conn) =
        mqtt_over_quic(&endpoint(first_ca.pem.as_bytes()), broker.quic, "old")
            .await
            .expect("the first certificate is served");
    assert!(
        mqtt_over_quic(&endpoint(second_ca.pem.as_bytes()), broker.quic, "early")
            .await
            .is_err(),
        "the second certificate is not served yet"
    );

    let second = second_ca.server("localhost");
    write(&key, &second.key);
    write(&cert, &second.cert);
    broker.hangup();
    let trusting_second = endpoint(second_ca.pem.as_bytes());
    let (new, mut new_events, _new_conn) = broker
        .eventually(
            STEP,
            "the new certificate served over QUIC after SIGHUP",
            || async {
                mqtt_over_quic(&trusting_second, broker.quic, "new")
                    .await
                    .ok()
            },
        )
        .await;
    echo(&new, &mut new_events, "after/new").await;
    // The connection from before the reload keeps working.
    echo(&old, &mut old_events, "after/old").await;
}

/// When a QUIC connection ends, the broker logs its statistics in the connection's span
/// (which names the client): round-trip time, congestion window, MTU, congestion events,
/// packets sent and lost, bytes lost, and the path validations that a client seen on a new
/// address costs; and adds the packets sent and lost to `/metrics`. Here the client moves to a
/// new UDP port midway, as after a NAT rebinding, and goes on.
#[tokio::test]
async fn the_disconnect_log_line_carries_the_connections_quic_statistics() {
    let mut broker = Broker::configured("", &[QUIC_LISTENER]);
    // The connection's span is at info in `drivers`, the statistics in `drivers::quic`.
    broker.log_json("warn,mqttd_broker::drivers=info");
    broker.restart();
    let endpoint = endpoint(&generated_ca(&broker));
    let (client, mut events, _conn) = mqtt_over_quic(&endpoint, broker.quic, "stats")
        .await
        .expect("connected");
    echo(&client, &mut events, "stats/before").await;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("a new UDP socket");
    endpoint.rebind(socket).expect("rebind");
    echo(&client, &mut events, "stats/after").await;
    client
        .disconnect(ReasonCode::Success, None)
        .await
        .expect("DISCONNECT");

    let is_stats = |r: &serde_json::Value| r["fields"]["message"] == "QUIC connection statistics";
    let record = broker
        .eventually(STEP, "the statistics logged at disconnect", || async {
            broker.log_records().into_iter().find(is_stats)
        })
        .await;
    assert_eq!(record["level"], "INFO", "{record}");
    assert_eq!(record["span"]["client_id"], "stats", "{record}");
    assert_eq!(record["span"]["transport"], "quic", "{record}");
    let field = |name: &str| {
        record["fields"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no {name} in {record}"))
    };
    assert!(field("rtt_ms") < STEP.as_millis() as u64, "{record}");
    assert!(field("cwnd") > 0, "{record}");
    // QUIC needs at least 1200 bytes; loopback has far more, the default probing stops at 1452.
    assert!((1200..=65535).contains(&field("mtu")), "{record}");
    let sent = field("sent_packets");
    let lost = field("lost_packets");
    assert!(sent > 0, "{record}");
    assert!(lost <= sent, "{record}");
    assert!(field("lost_bytes") <= 65535 * lost, "{record}");
    assert!(field("congestion_events") <= lost, "{record}");
    assert!(
        field("path_challenges") >= 1,
        "the client's new address was not validated: {record}"
    );
    // The only QUIC connection: the totals are its own.
    let metrics = broker.metrics();
    assert_eq!(metrics.get("mqttd_quic_sent_packets_total"), sent as f64);
    assert_eq!(metrics.get("mqttd_quic_lost_packets_total"), lost as f64);
}

/// An MQTT client over QUIC with `mqttd-client`'s transport, trusting `server_ca` and
/// presenting the certificate and key files `identity` if given.
async fn quic_client(
    broker: &Broker,
    server_ca: &Path,
    identity: Option<&(PathBuf, PathBuf)>,
    config: ClientConfig,
) -> Result<(Client, Events), ConnectError> {
    let mut endpoint =
        mqttd_client::Endpoint::new(Transport::Quic, "localhost", broker.quic.port());
    endpoint.tls.ca_file = Some(server_ca.to_owned());
    if let Some((cert, key)) = identity {
        endpoint.tls.cert_file = Some(cert.clone());
        endpoint.tls.key_file = Some(key.clone());
    }
    let connector = Connector::new(endpoint)?;
    let (client, events, _) = within(STEP, "CONNACK", connect_to(&connector, config, None)).await?;
    Ok((client, events))
}

/// Mutual TLS over QUIC, as over TLS: with `require_client_cert` and
/// `use_identity_as_username`, the client certificate's CN is the user name the ACL applies to,
/// whatever CONNECT says; a client without a certificate, or with one from another CA, fails
/// the handshake.
#[tokio::test]
async fn quic_client_certificate_identity_is_the_user_name() {
    let clients_ca = TestCa::new("test clients CA");
    let (broker, root) = client_cert_broker(&clients_ca, DEVICE_ACL, QUIC_LISTENER, true);
    let server_ca = broker.data_dir().join("tls/ca.pem");

    // The CONNECT claims to be admin; the certificate says device-1, and device-1 it is.
    let device = clients_ca.client("device-1").write_to(&root, "device-1");
    let (client, mut events) = quic_client(
        &broker,
        &server_ca,
        Some(&device),
        mqtt_config("d1", Some("admin")),
    )
    .await
    .expect("device-1 connects with its certificate");
    assert_is_device_1(&client, &mut events).await;

    // No certificate, or one from another CA: the broker closes the connection with a TLS
    // alert, which the client sees once it uses the connection, as over TLS.
    let forged = TestCa::new("test clients CA")
        .client("device-1")
        .write_to(&root, "forged");
    for (what, identity) in [("no certificate", None), ("another CA's", Some(&forged))] {
        let refused = quic_client(
            &broker,
            &server_ca,
            identity,
            mqtt_config("refused", Some("admin")),
        )
        .await;
        assert!(
            matches!(
                refused,
                Err(ConnectError::Transport(TransportError::Tls(
                    TlsError::Alert(_)
                )))
            ),
            "{what}: {:?}",
            refused.err()
        );
    }
    let failures = broker
        .wait_for_metrics(STEP, |m| {
            m.get("mqttd_quic_handshake_failures_total") >= 2.0
        })
        .await;
    assert_eq!(failures.get("mqttd_quic_handshake_failures_total"), 2.0);
    assert_eq!(failures.get("mqttd_quic_handshakes_total"), 1.0);

    // device-1 is still connected and working.
    round_trip(&client, &mut events, "devices/device-1/temp", "22").await;
}

/// Without `require_client_cert`, a QUIC client without a certificate gets in with no user
/// name (the ACL's anonymous rules apply to it), while one with a certificate is its CN.
#[tokio::test]
async fn optional_quic_client_certificate_leaves_others_anonymous() {
    let clients_ca = TestCa::new("test clients CA");
    let (broker, root) = client_cert_broker(
        &clients_ca,
        "topic read public/#\n\nuser sensor-7\ntopic readwrite sensors/7/#\n",
        QUIC_LISTENER,
        false,
    );
    let server_ca = broker.data_dir().join("tls/ca.pem");
    let reasons = |client: &Client| {
        let client = client.clone();
        async move {
            let mut reasons = Vec::new();
            for f in ["public/#", "sensors/7/#"] {
                let ack = client
                    .subscribe_one(filter(f), QoS::AtMostOnce)
                    .await
                    .expect("SUBACK");
                reasons.push(ack.reasons[0]);
            }
            reasons
        }
    };

    // The user name in CONNECT counts for nothing: it is anonymous.
    let (anon, _events) = quic_client(
        &broker,
        &server_ca,
        None,
        mqtt_config("anon", Some("sensor-7")),
    )
    .await
    .expect("an anonymous client connects");
    assert_eq!(
        reasons(&anon).await,
        [ReasonCode::Success, ReasonCode::NotAuthorized]
    );

    let sensor = clients_ca.client("sensor-7").write_to(&root, "sensor-7");
    let (sensor, _events) =
        quic_client(&broker, &server_ca, Some(&sensor), mqtt_config("s7", None))
            .await
            .expect("sensor-7 connects");
    assert_eq!(
        reasons(&sensor).await,
        [ReasonCode::NotAuthorized, ReasonCode::Success]
    );
}
