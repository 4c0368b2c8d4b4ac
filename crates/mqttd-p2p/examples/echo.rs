//! Two nodes in one process: one accepts connections for an ALPN and echoes a stream, the
//! other connects to it by id and address, sends a line and prints the reply and the path.
//!
//! `cargo run -p mqttd-p2p --example echo`

use mqttd_p2p::{Node, NodeAddr, NodeConfig, NodeKey};

const ALPN: &[u8] = b"mqttd-p2p/echo/1";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The accepting node: a fresh identity (a real one comes from NodeKey::load_or_create).
    let mut config = NodeConfig::new(NodeKey::generate());
    config.bind = vec!["127.0.0.1:0".parse()?];
    config.alpns = vec![ALPN.to_vec()];
    let server = Node::bind(config).await?;
    println!("server {} on {:?}", server.id(), server.bound_addrs());

    let echo = tokio::spawn({
        let server = server.clone();
        async move {
            while let Some(incoming) = server.accept().await {
                let Ok(conn) = incoming.accept().await else {
                    continue;
                };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let Ok(data) = recv.read_to_end(64 * 1024).await else {
                        break;
                    };
                    let _ = send.write_all(&data).await;
                    let _ = send.finish();
                }
            }
        }
    });

    // The dialing node knows the server's id and direct address (no relay here).
    let mut config = NodeConfig::new(NodeKey::generate());
    config.bind = vec!["127.0.0.1:0".parse()?];
    let client = Node::bind(config).await?;
    let to = NodeAddr::new(server.id()).with_direct(server.bound_addrs());
    let conn = client.connect(to, ALPN).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(b"hello over mqttd-p2p").await?;
    send.finish()?;
    let reply = recv.read_to_end(64 * 1024).await?;
    println!("reply: {}", String::from_utf8_lossy(&reply));
    if let Some(path) = conn.selected_path() {
        println!("path: {} rtt {:?}", path.kind, path.rtt);
    }

    conn.close(0, b"bye");
    client.close().await;
    server.close().await;
    echo.await?;
    Ok(())
}
