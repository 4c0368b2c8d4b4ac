//! MQTT over WebSocket: the upgrade (subprotocol `mqtt`) and a pump between the frames and a
//! byte stream.
//!
//! The pump is a task that owns the WebSocket and one end of an in-memory pipe; the connection
//! gets the other end. Each read from the pipe goes out as one binary frame and is flushed at
//! once (MQTT packets must not wait in a buffer); each binary frame received is written into
//! the pipe. Sending and receiving run side by side, so a server that waits for us to read
//! before it reads cannot deadlock us. The task ends when the connection drops its end (a
//! Close frame is sent) or when the server closes (the connection reads end-of-stream).

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::{ByteStream, TransportError};

/// Bytes the pipe holds in each direction; beyond this the side writing waits.
const PIPE: usize = 64 * 1024;

/// Upgrades `stream` to a WebSocket at `url` and returns the byte stream of the MQTT bytes.
pub(super) async fn upgrade(
    stream: Box<dyn ByteStream>,
    url: &str,
) -> Result<DuplexStream, TransportError> {
    let fail = |reason: String| TransportError::WebSocket {
        url: url.to_owned(),
        reason,
    };
    let mut request = url.into_client_request().map_err(|e| fail(e.to_string()))?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    let (ws, _response) = tokio_tungstenite::client_async(request, stream)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let (app, pump) = tokio::io::duplex(PIPE);
    tokio::spawn(run_pump(ws, pump));
    Ok(app)
}

async fn run_pump(ws: WebSocketStream<Box<dyn ByteStream>>, pipe: DuplexStream) {
    let (mut sink, mut frames) = ws.split();
    let (mut from_app, mut to_app) = tokio::io::split(pipe);
    let outbound = async move {
        let mut buf = vec![0u8; PIPE];
        loop {
            match from_app.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let frame = Message::Binary(buf[..n].to_vec().into());
                    if sink.send(frame).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = sink.close().await;
    };
    let inbound = async move {
        while let Some(Ok(message)) = frames.next().await {
            let data = match message {
                Message::Binary(data) => data,
                Message::Close(_) => break,
                // Pings are answered by tungstenite; MQTT has no use for text frames.
                _ => continue,
            };
            if to_app.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = to_app.shutdown().await;
    };
    // Either direction ending ends the connection: the application closed its end (and a
    // Close frame went out), or the server went away (and the application reads end-of-stream).
    tokio::select! {
        () = outbound => {}
        () = inbound => {}
    }
}
