//! MQTT over QUIC against the real binary: it prints its `quic://` listener, serves it with the
//! CA it generated, and on SIGHUP gives new QUIC connections the new certificate while one made
//! before keeps working. Clients are noq with the MQTT client of `mqttd-client` over one stream.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use noq::crypto::rustls::QuicClientConfig;
use noq::Endpoint;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use mqttd_client::{Client, Events};
use mqttd_proto::client::ClientConfig;
use mqttd_proto::{ClientId, Message, QoS, TopicFilter, TopicName};

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

async fn round_trip(client: &Client, events: &mut Events, topic: &str) {
    client
        .subscribe_one(
            TopicFilter::try_from(topic).expect("filter"),
            QoS::AtLeastOnce,
        )
        .await
        .expect("SUBACK");
    let message = Message::new(
        TopicName::try_from(topic).expect("topic"),
        b"ping".to_vec(),
        QoS::AtLeastOnce,
        false,
    );
    let _ = client.publish(message).await.expect("published");
    let got = within(STEP, "the message back", events.next_message())
        .await
        .expect("connection up");
    assert_eq!(&got.message.payload[..], b"ping");
}

#[tokio::test]
async fn mqttd_prints_its_quic_listener_and_serves_it_with_the_generated_ca() {
    let broker = Broker::start_with("", &[QUIC_LISTENER]);
    assert_ne!(broker.quic.port(), 0);
    let ca = std::fs::read(broker.data_dir().join("tls/ca.pem")).expect("generated CA");
    let (client, mut events, _conn) = mqtt_over_quic(&endpoint(&ca), broker.quic, "q")
        .await
        .expect("handshake with the generated CA");
    round_trip(&client, &mut events, "quic/echo").await;
}

/// A test CA and a `localhost` server certificate it signs, as PEM.
fn ca_and_server(name: &str) -> (String, String, String) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key).expect("CA");
    let issuer = Issuer::new(params, ca_key);
    let key = KeyPair::generate().expect("server key");
    let params = CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
    let cert = params.signed_by(&key, &issuer).expect("server certificate");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).expect("write");
    path.to_owned()
}

#[tokio::test]
async fn sighup_gives_quic_connections_the_new_certificate() {
    let (first_ca, first_cert, first_key) = ca_and_server("first CA");
    let (second_ca, second_cert, second_key) = ca_and_server("second CA");
    let mut broker = Broker::configured("", &[QUIC_LISTENER]);
    let root = broker.root().to_owned();
    let cert = write(&root.join("server.pem"), &first_cert);
    let key = write(&root.join("server-key.pem"), &first_key);
    write(
        &root.join("mqttd.toml"),
        &format!("[tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n"),
    );
    broker.restart();
    let (old, mut old_events, _old_conn) =
        mqtt_over_quic(&endpoint(first_ca.as_bytes()), broker.quic, "old")
            .await
            .expect("the first certificate is served");
    assert!(
        mqtt_over_quic(&endpoint(second_ca.as_bytes()), broker.quic, "early")
            .await
            .is_err(),
        "the second certificate is not served yet"
    );

    write(&key, &second_key);
    write(&cert, &second_cert);
    broker.hangup();
    let trusting_second = endpoint(second_ca.as_bytes());
    let deadline = Instant::now() + STEP;
    let (new, mut new_events, _new_conn) = loop {
        if let Ok(connected) = mqtt_over_quic(&trusting_second, broker.quic, "new").await {
            break connected;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate is not served over QUIC after SIGHUP\n{}",
            broker.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    round_trip(&new, &mut new_events, "after/new").await;
    // The connection from before the reload keeps working.
    round_trip(&old, &mut old_events, "after/old").await;
}
