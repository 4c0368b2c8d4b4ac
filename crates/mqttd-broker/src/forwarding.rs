//! The broker's side of cluster forwarding: local subscriptions feed the cluster's route
//! table, publications go to the nodes with matching subscribers, and messages forwarded by
//! other nodes are delivered to local subscribers only.
//!
//! [`attach`] hands the broker a [`Router`]; from then on:
//! - [`Inner::subscribe`] and [`Inner::unsubscribe_all`] (which a session's end goes through)
//!   count each (session, filter) into the route table, so that a filter is announced to the
//!   peers with its first local subscriber and withdrawn with its last;
//! - every publication routed here ([`Inner::route_or_block`], [`Inner::route_whole`]) is
//!   also forwarded to the peers whose routes match, at most once per peer;
//! - a task takes the messages peers forward and routes them locally
//!   ([`Inner::route_forwarded`]), never forwarding them again.
//!
//! Between nodes a message travels at most once, whatever its QoS (the receiving node
//! delivers it with the QoS of the publication and the subscription as usual).

use std::sync::Arc;

use mqttd_cluster::{ForwardedMessage, MessageProperties, Router};
use mqttd_proto::{Message, MqttStr, QoS, TopicName};

use crate::broker::Inner;

/// Connects the broker to the cluster's router: announces the subscriptions held now, and
/// starts the task that delivers forwarded messages (it ends with the broker). Call it once,
/// after the sessions are restored and before the listeners accept clients; a second call
/// changes nothing.
pub(crate) fn attach(inner: &Arc<Inner>, router: &Router) {
    if !inner.attach_router(router.clone()) {
        return;
    }
    let Some(mut incoming) = router.incoming() else {
        tracing::warn!("the cluster's forwarded messages are already taken");
        return;
    };
    let inner = inner.clone();
    let tasks = inner.tasks.clone();
    tasks.spawn(async move {
        loop {
            let forwarded = tokio::select! {
                biased;
                () = inner.shutdown.cancelled() => break,
                m = incoming.recv() => match m {
                    Some(m) => m,
                    None => break,
                },
            };
            let now = crate::clock::now();
            match to_message(&forwarded, now) {
                Some(message) => {
                    inner.route_forwarded(now, &Arc::new(message), &forwarded.share_groups);
                }
                None => {
                    inner.metrics.messages_dropped.inc();
                    tracing::debug!(
                        origin = forwarded.origin,
                        "a forwarded message is not valid MQTT"
                    );
                }
            }
        }
    });
}

/// The message to forward for `message`, published here, at `now`.
pub(crate) fn to_forwarded(
    message: &Message,
    now: std::time::Instant,
    origin: u64,
) -> ForwardedMessage {
    let p = &message.properties;
    ForwardedMessage {
        origin,
        topic: message.topic.as_str().to_owned(),
        payload: message.payload.clone(),
        qos: message.qos as u8,
        retain: message.retain,
        properties: MessageProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: message.remaining_expiry(now),
            content_type: p.content_type.as_ref().map(|s| s.as_str().to_owned()),
            response_topic: p.response_topic.as_ref().map(|s| s.as_str().to_owned()),
            correlation_data: p.correlation_data.clone(),
            user_properties: p
                .user_properties
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.as_str().to_owned()))
                .collect(),
        },
        share_groups: Vec::new(),
    }
}

/// The local message for one forwarded by a peer, or `None` if it is not valid MQTT (a peer
/// runs the same code, so this is a bug or a corrupt link, never a client's doing).
pub(crate) fn to_message(m: &ForwardedMessage, now: std::time::Instant) -> Option<Message> {
    let p = &m.properties;
    let mut message = message_from(
        &m.topic,
        m.payload.clone(),
        m.qos,
        m.retain,
        Strings {
            content_type: p.content_type.as_deref(),
            response_topic: p.response_topic.as_deref(),
            user_properties: &p.user_properties,
        },
    )?;
    message.properties.payload_format_indicator = p.payload_format_indicator;
    message.properties.correlation_data = p.correlation_data.clone();
    message.expires_at = p
        .message_expiry_interval
        .map(|secs| now + std::time::Duration::from_secs(u64::from(secs)));
    Some(message)
}

/// The string properties of a message another node sent or the cluster stored.
pub(crate) struct Strings<'a> {
    pub(crate) content_type: Option<&'a str>,
    pub(crate) response_topic: Option<&'a str>,
    pub(crate) user_properties: &'a [(String, String)],
}

/// A local message from what another node sent or the cluster stored, or `None` if any part
/// is not valid MQTT (nodes run the same code, so that is a bug or corruption, never a
/// client's doing). The other properties are the caller's to set.
pub(crate) fn message_from(
    topic: &str,
    payload: bytes::Bytes,
    qos: u8,
    retain: bool,
    strings: Strings<'_>,
) -> Option<Message> {
    let s = |v: &str| MqttStr::try_from(v).ok();
    let topic = TopicName::new(s(topic)?).ok()?;
    let qos = QoS::from_bits(qos)?;
    let mut message = Message::new(topic, payload, qos, retain);
    message.properties.content_type = match strings.content_type {
        Some(v) => Some(s(v)?),
        None => None,
    };
    message.properties.response_topic = match strings.response_topic {
        Some(v) => Some(TopicName::new(s(v)?).ok()?),
        None => None,
    };
    message.properties.user_properties = strings
        .user_properties
        .iter()
        .map(|(k, v)| Some((s(k)?, s(v)?)))
        .collect::<Option<_>>()?;
    Some(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn a_message_survives_the_trip_with_its_properties() {
        let now = Instant::now();
        let topic = TopicName::new(MqttStr::try_from("a/b").unwrap()).unwrap();
        let mut m = Message::new(topic, Bytes::from_static(b"x"), QoS::AtLeastOnce, true);
        m.properties.payload_format_indicator = Some(true);
        m.properties.content_type = Some(MqttStr::try_from("text/plain").unwrap());
        m.properties.response_topic =
            Some(TopicName::new(MqttStr::try_from("r/1").unwrap()).unwrap());
        m.properties.correlation_data = Some(Bytes::from_static(b"id"));
        m.properties.user_properties = vec![(
            MqttStr::try_from("k").unwrap(),
            MqttStr::try_from("v").unwrap(),
        )];
        m.expires_at = Some(now + Duration::from_secs(30));
        let f = to_forwarded(&m, now, 7);
        assert_eq!((f.origin, f.qos), (7, 1));
        assert_eq!(f.properties.message_expiry_interval, Some(30));
        let back = to_message(&f, now).unwrap();
        assert_eq!(back, m);
        let mut bad = f.clone();
        bad.topic = "a/+".into();
        assert!(to_message(&bad, now).is_none(), "a wildcard is no topic");
        bad = f;
        bad.qos = 3;
        assert!(to_message(&bad, now).is_none());
    }

    use std::collections::{BTreeMap, BTreeSet};
    use std::time::{Duration, Instant, SystemTime};

    use mqttd_cluster::network::Tls;
    use mqttd_cluster::{ClusterNode, NodeOptions};
    use mqttd_proto::{ClientId, SubscriptionOptions, TopicFilter};

    use crate::access::AccessControl;
    use crate::auth::ScramServer;
    use crate::broker::{Mailbox, Slot, Subscriber};
    use crate::config::Config;

    fn inner() -> Arc<Inner> {
        Arc::new(Inner::new(
            Config::default(),
            Arc::new(crate::hooks::NoHooks),
            AccessControl::default(),
            ScramServer::new([0; 32]),
            Arc::new(crate::storage::MemoryStorage::default()),
        ))
    }

    /// Two cluster nodes with certificates from one generated CA, the first initializing.
    async fn two_nodes(dir: &std::path::Path) -> (ClusterNode, ClusterNode) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca.clone().self_signed(&ca_key).unwrap().pem();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let mut nodes = Vec::new();
        for id in 1..=2u64 {
            let name = format!("node-{id}");
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.subject_alt_names = vec![SanType::DnsName(name.clone().try_into().unwrap())];
            let cert = params.signed_by(&key, &issuer).unwrap();
            let tls = Tls::from_pem(
                ca_pem.as_bytes(),
                cert.pem().as_bytes(),
                key.serialize_pem().as_bytes(),
            )
            .unwrap();
            let options = NodeOptions::new(
                id,
                &name,
                "127.0.0.1:0".parse().unwrap(),
                dir.join(&name),
                tls,
            );
            nodes.push(ClusterNode::start(options).await.unwrap());
        }
        let b = nodes.pop().unwrap();
        let a = nodes.pop().unwrap();
        let members = BTreeMap::from([(1, a.member().clone()), (2, b.member().clone())]);
        a.initialize(members).await.unwrap();
        (a, b)
    }

    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A subscriber's session on broker B gets what is published on broker A, once; the
    /// route goes when the session ends; what came from a peer is not sent back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_publication_reaches_a_subscriber_on_another_node() {
        let dir = tempfile::tempdir().unwrap();
        let (node_a, node_b) = two_nodes(dir.path()).await;
        let (a, b) = (inner(), inner());
        attach(&a, node_a.router());
        attach(&b, node_b.router());

        // An offline session on B with a QoS 1 subscription: routed copies queue in it.
        let now = Instant::now();
        let id = ClientId::try_from("sub").unwrap();
        let mailbox = Arc::new(Mailbox::default());
        let acquired = b.acquire_session(now, &id, true, 3600, &mailbox).await;
        let handle = acquired.handle;
        b.park_session(now, &handle, acquired.session, SystemTime::now());
        let filter = TopicFilter::try_from("t/+").unwrap();
        let sub = Subscriber {
            handle: handle.clone(),
            options: SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..SubscriptionOptions::default()
            },
            id: None,
            shared: None,
        };
        b.subscribe(&[(filter.clone(), sub)]);
        handle
            .subscriptions
            .lock()
            .insert(filter, (SubscriptionOptions::default(), None));
        let routed_at = |node: &ClusterNode| node.router().nodes_for("t/1");
        eventually("A learns B's route", || {
            routed_at(&node_a) == BTreeSet::from([2])
                && node_a
                    .router()
                    .stats()
                    .nodes
                    .get(&2)
                    .is_some_and(|s| s.link_up)
        })
        .await;

        let topic = TopicName::try_from("t/1").unwrap();
        let message = Arc::new(Message::new(
            topic,
            b"hello".to_vec(),
            QoS::AtLeastOnce,
            false,
        ));
        assert_eq!(a.route(now, &message, None), 0, "no subscriber on A");
        let queued = |handle: &crate::broker::SessionHandle| match &*handle.slot.lock() {
            Slot::Offline { session, .. } => session
                .queued()
                .map(|d| (d.message.payload.clone(), d.qos))
                .collect::<Vec<_>>(),
            _ => Vec::new(),
        };
        eventually("the message queued on B", || !queued(&handle).is_empty()).await;
        assert_eq!(
            queued(&handle),
            vec![(Bytes::from_static(b"hello"), QoS::AtLeastOnce)]
        );
        assert_eq!(node_a.router().stats().forwarded_out, 1);
        assert_eq!(node_b.router().stats().forwarded_out, 0, "not sent back");

        // The session ends: its route is withdrawn.
        b.end_session(Instant::now(), &handle, None);
        eventually("B's route withdrawn at A", || routed_at(&node_a).is_empty()).await;

        node_a.shutdown().await;
        node_b.shutdown().await;
    }

    /// A forwarded message reaches every plain subscriber here, and of the shared groups
    /// only those the origin named.
    #[tokio::test]
    async fn forwarded_messages_serve_only_the_named_share_groups() {
        let b = inner();
        let now = Instant::now();
        let mailbox = Arc::new(Mailbox::default());
        let mut handles = Vec::new();
        for (client, filter) in [
            ("plain", "t/#"),
            ("g1", "$share/g/t/#"),
            ("h1", "$share/h/t/#"),
        ] {
            let id = ClientId::try_from(client).unwrap();
            let acquired = b.acquire_session(now, &id, true, 3600, &mailbox).await;
            let handle = acquired.handle;
            b.park_session(now, &handle, acquired.session, SystemTime::now());
            let filter = TopicFilter::try_from(filter).unwrap();
            let shared = filter.share().is_some().then(|| filter.clone());
            let sub = Subscriber {
                handle: handle.clone(),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..SubscriptionOptions::default()
                },
                id: None,
                shared,
            };
            b.subscribe(&[(filter, sub)]);
            handles.push(handle);
        }
        let queued = |handle: &crate::broker::SessionHandle| match &*handle.slot.lock() {
            Slot::Offline { session, .. } => session.queued().count(),
            _ => 0,
        };
        let topic = TopicName::try_from("t/1").unwrap();
        let message = Arc::new(Message::new(topic, b"x".to_vec(), QoS::AtLeastOnce, false));
        assert_eq!(b.route_forwarded(now, &message, &[]), 1);
        assert_eq!(b.route_forwarded(now, &message, &["g".to_owned()]), 2);
        assert_eq!(
            b.route_forwarded(now, &message, &["g".to_owned(), "h".to_owned()]),
            3
        );
        let counts: Vec<usize> = handles.iter().map(|h| queued(h)).collect();
        assert_eq!(counts, vec![3, 2, 1], "plain, group g, group h");
    }
}
