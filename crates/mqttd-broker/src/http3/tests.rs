//! HTTP/3 over noq on loopback, with the h3 crate's client over the same adapter. ngtcp2's
//! client checks the real listener in `crates/mqttd/tests/http3.rs`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{header, Method, Request, StatusCode};
use bytes::{Buf, Bytes};
use noq::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::*;
use crate::access::AccessControl;
use crate::auth::scram::ScramServer;
use crate::config::Config;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn inner() -> Arc<Inner> {
    Arc::new(Inner::new(
        Config::default(),
        Arc::new(crate::hooks::NoHooks),
        AccessControl::default(),
        ScramServer::new([0; 32]),
        Arc::new(crate::storage::MemoryStorage::default()),
    ))
}

/// A noq endpoint on loopback that serves every connection with [`serve`], set up as the QUIC
/// listener sets up its own: ALPN `mqtt` and `h3`, and the three unidirectional streams that
/// HTTP/3 clients check the transport parameters for (ngtcp2 refuses a server with fewer).
struct Server {
    endpoint: noq::Endpoint,
    cert: CertificateDer<'static>,
    inner: Arc<Inner>,
    tasks: JoinSet<()>,
}

impl Server {
    async fn start() -> Self {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = certified.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        tls.alpn_protocols = vec![b"mqtt".to_vec(), ALPN.to_vec()];
        let mut config =
            noq::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls).unwrap()));
        let mut transport = noq::TransportConfig::default();
        transport.max_concurrent_uni_streams(MIN_UNI_STREAMS.into());
        config.transport_config(Arc::new(transport));
        let endpoint = noq::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let inner = inner();
        let mut tasks = JoinSet::new();
        let (accepting, served) = (endpoint.clone(), inner.clone());
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Some(incoming) = accepting.accept().await {
                let inner = served.clone();
                connections.spawn(async move {
                    if let Ok(conn) = incoming.await {
                        serve(conn, inner).await;
                    }
                });
            }
        });
        Self {
            endpoint,
            cert,
            inner,
            tasks,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.endpoint.local_addr().unwrap()
    }

    /// A QUIC connection to the server that trusts its certificate and asks for `h3`.
    async fn connect(&self) -> noq::Connection {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone()).unwrap();
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let config = noq::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
        let endpoint = noq::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(config);
        endpoint
            .connect(self.addr(), "localhost")
            .unwrap()
            .await
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.endpoint.close(0u8.into(), b"");
        self.tasks.abort_all();
    }
}

type SendRequest = h3::client::SendRequest<adapter::Opener, Bytes>;

/// An h3 client on `conn`, its connection driven by a task of its own.
async fn client(conn: noq::Connection) -> (SendRequest, tokio::task::JoinHandle<()>) {
    let (mut driver, send) = h3::client::new(adapter::Connection::new(conn))
        .await
        .unwrap();
    let driving = tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    (send, driving)
}

/// What came back for a request: status, headers and body.
struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: header::HeaderName) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
}

async fn request(
    send: &mut SendRequest,
    method: Method,
    path: &str,
    body: &[u8],
) -> Result<Answer, StreamError> {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("https://localhost{path}"));
    if !body.is_empty() {
        request = request.header(header::CONTENT_LENGTH, body.len());
    }
    let mut stream = send.send_request(request.body(()).unwrap()).await?;
    if !body.is_empty() {
        stream.send_data(Bytes::copy_from_slice(body)).await?;
    }
    stream.finish().await?;
    let response = stream.recv_response().await?;
    let mut received = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await? {
        while chunk.has_remaining() {
            let part = chunk.chunk();
            received.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(Answer {
        status: response.status(),
        headers: response.headers().clone(),
        body: received,
    })
}

async fn get(send: &mut SendRequest, path: &str) -> Answer {
    request(send, Method::GET, path, b"").await.unwrap()
}

#[tokio::test]
async fn health_and_metrics_answer_as_the_http_endpoint_does() {
    let server = Server::start().await;
    let (mut send, _driving) = client(server.connect().await).await;

    let health = get(&mut send, "/health").await;
    let expected = Page::Health.reply(&server.inner);
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.header(header::CONTENT_TYPE), expected.content_type);
    assert_eq!(health.body, b"ok\n");
    assert_eq!(health.header(header::CONTENT_LENGTH), "3");

    let metrics = get(&mut send, "/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert_eq!(
        metrics.header(header::CONTENT_TYPE),
        Page::Metrics.reply(&server.inner).content_type
    );
    let text = String::from_utf8(metrics.body).unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(text.contains("mqttd_"), "{text}");

    // The query string is not part of the path, as over HTTP/1.1.
    assert_eq!(get(&mut send, "/health?probe=1").await.body, b"ok\n");

    // While the broker shuts down, health says so.
    server.inner.shutdown.cancel();
    let (mut send, _driving) = client(server.connect().await).await;
    let health = request(&mut send, Method::GET, "/health", b"").await;
    // The connection may already have been sent GOAWAY; if the request got through, it was
    // answered 503.
    if let Ok(health) = health {
        assert_eq!(health.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(health.body, b"shutting down\n");
    }
}

#[tokio::test]
async fn other_paths_methods_and_large_bodies_are_refused() {
    let server = Server::start().await;
    let (mut send, _driving) = client(server.connect().await).await;

    let missing = get(&mut send, "/admin").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(missing.body.is_empty());

    let post = request(&mut send, Method::POST, "/health", b"x")
        .await
        .unwrap();
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.header(header::ALLOW), ALLOW);

    let head = request(&mut send, Method::HEAD, "/health", b"")
        .await
        .unwrap();
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.header(header::CONTENT_LENGTH), "3");
    assert!(head.body.is_empty());

    // A body up to MAX_BODY is read and dropped; one byte more is refused.
    let small = request(&mut send, Method::GET, "/health", &[b'x'; MAX_BODY])
        .await
        .unwrap();
    assert_eq!(small.status, StatusCode::OK);
    let large = request(&mut send, Method::GET, "/health", &[b'x'; MAX_BODY + 1]).await;
    // The server may stop the request stream before the client has sent all of it; when
    // the client gets to read, the answer is 413.
    if let Ok(large) = large {
        assert_eq!(large.status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    // The connection still serves.
    assert_eq!(get(&mut send, "/health").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_connection_gets_max_requests_answers_then_goaway() {
    let server = Server::start().await;
    let conn = server.connect().await;
    let (mut send, _driving) = client(conn.clone()).await;
    let mut answered = 0;
    for _ in 0..MAX_REQUESTS + 5 {
        match request(&mut send, Method::GET, "/health", b"").await {
            Ok(answer) if answer.status == StatusCode::OK => answered += 1,
            _ => break,
        }
    }
    assert_eq!(answered, MAX_REQUESTS);
    // The server closes the connection, at the latest CLOSE_GRACE after its last answer.
    let closed = timeout(CLOSE_GRACE * 5, conn.closed()).await;
    assert!(closed.is_ok(), "the connection is still open");
}
