//! An embedding program's hooks decide what each client may receive, with or without an ACL
//! file: `Hooks::authorize` is asked about `Action::Receive` for every message, retained or
//! routed, before it is sent.

use std::sync::{Arc, Mutex};

use mqttd_broker::{Action, Broker, ClientInfo, Config, Hooks, ListenerKind, Verdict};
use mqttd_client::connect_tcp;
use mqttd_proto::client::ClientConfig;
use mqttd_proto::{ClientId, Message, QoS, ReasonCode, TopicFilter, TopicName};

mod common;
use common::next_payload;

/// Refuses `reader` anything under `private/`; records every receive question.
#[derive(Clone, Default)]
struct ReceiveHooks {
    asked: Arc<Mutex<Vec<(String, String)>>>,
}

impl Hooks for ReceiveHooks {
    fn authorize(&self, client: &ClientInfo, action: Action, topic: &str) -> Verdict {
        if action != Action::Receive {
            return Verdict::Defer;
        }
        self.asked
            .lock()
            .unwrap()
            .push((client.client_id.to_string(), topic.to_owned()));
        if client.client_id.as_str() == "reader" && topic.starts_with("private/") {
            Verdict::Deny(ReasonCode::NotAuthorized)
        } else {
            Verdict::Defer
        }
    }
}

fn msg(topic: &str, payload: &str, retain: bool) -> Message {
    Message::new(
        TopicName::try_from(topic).unwrap(),
        payload.as_bytes().to_vec(),
        QoS::AtLeastOnce,
        retain,
    )
}

#[tokio::test]
async fn receive_is_authorized_by_hooks_without_an_acl_file() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = ReceiveHooks::default();
    let mut config = Config::default();
    config.listen = vec!["tcp://127.0.0.1:0".into()];
    config.data_dir = dir.path().join("data");
    config.acl_file = None;
    let broker = Broker::builder(config)
        .hooks(hooks.clone())
        .start()
        .await
        .unwrap();
    let addr = broker.addr(ListenerKind::Tcp).unwrap();
    let connect = |id: &str| {
        connect_tcp(
            addr,
            ClientConfig::new(ClientId::try_from(id).unwrap()),
            None,
        )
    };

    let (publisher, _pub_events, _) = connect("writer").await.unwrap();
    // Retained before the subscription: sent (or not) when it is made.
    for m in [
        msg("private/kept", "retained-private", true),
        msg("public/kept", "retained-public", true),
    ] {
        let _ = publisher.publish(m).await.unwrap();
    }
    let (reader, mut events, _) = connect("reader").await.unwrap();
    reader
        .subscribe_one(TopicFilter::try_from("#").unwrap(), QoS::AtLeastOnce)
        .await
        .unwrap();
    for m in [
        msg("private/live", "live-private", false),
        msg("public/live", "live-public", false),
        msg("public/end", "marker", false),
    ] {
        let _ = publisher.publish(m).await.unwrap();
    }
    // The marker is published last: once it arrives, everything before it was delivered or
    // refused.
    let mut got = Vec::new();
    loop {
        let payload = next_payload(&mut events).await;
        if payload == "marker" {
            break;
        }
        got.push(payload);
    }
    got.sort();
    assert_eq!(got, ["live-public", "retained-public"]);
    let asked = hooks.asked.lock().unwrap().clone();
    for topic in ["private/kept", "private/live", "public/live"] {
        assert!(
            asked.contains(&("reader".to_owned(), topic.to_owned())),
            "the hooks were not asked about {topic}: {asked:?}"
        );
    }
    broker.shutdown().await;
}
