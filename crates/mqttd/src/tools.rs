//! `mqttd pub` and `mqttd sub`: command-line clients in the manner of `mosquitto_pub` and
//! `mosquitto_sub`.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use mqttd_client::{connect_tcp, Client, Events};
use mqttd_proto::client::{ClientConfig, Event};
use mqttd_proto::session::Enqueued;
use mqttd_proto::{
    ClientId, Message, ProtocolVersion, QoS, ReasonCode, SubscribeProperties, Subscription,
    SubscriptionOptions, TopicFilter, TopicName,
};
use tokio::net::lookup_host;

/// Connection options shared by the client tools.
#[derive(Debug, Args)]
pub(crate) struct ConnectArgs {
    /// Broker host.
    #[arg(short = 'H', long, default_value = "127.0.0.1")]
    host: String,
    /// Broker port.
    #[arg(short, long, default_value_t = 1883)]
    port: u16,
    /// Client identifier (empty: the broker assigns one).
    #[arg(short, long, default_value = "")]
    id: String,
    /// User name.
    #[arg(short, long)]
    username: Option<String>,
    /// Password.
    #[arg(short = 'P', long)]
    password: Option<String>,
    /// MQTT version: 5, 311 or 31.
    #[arg(short = 'V', long, default_value = "5")]
    protocol: String,
    /// Keep alive in seconds.
    #[arg(short, long, default_value_t = 60)]
    keepalive: u16,
    /// Resume a stored session instead of starting clean.
    #[arg(short = 'c', long)]
    no_clean: bool,
    /// Session expiry interval in seconds (MQTT 5).
    #[arg(short = 'x', long, default_value_t = 0)]
    session_expiry: u32,
}

impl ConnectArgs {
    fn config(&self) -> anyhow::Result<ClientConfig> {
        let id = ClientId::try_from(self.id.as_str()).context("client identifier")?;
        let mut config = ClientConfig::new(id);
        config.version = match self.protocol.as_str() {
            "5" | "mqttv5" => ProtocolVersion::V5,
            "311" | "mqttv311" => ProtocolVersion::V3_1_1,
            "31" | "mqttv31" => ProtocolVersion::V3_1,
            other => bail!("unknown protocol version {other:?} (5, 311 or 31)"),
        };
        config.keep_alive = self.keepalive;
        config.clean_start = !self.no_clean;
        config.session_expiry_interval = self.session_expiry;
        config.username = self
            .username
            .as_deref()
            .map(TryInto::try_into)
            .transpose()?;
        config.password = self.password.clone().map(Bytes::from);
        config.topic_alias_maximum = 64;
        Ok(config)
    }

    async fn connect(&self) -> anyhow::Result<(Client, Events)> {
        let addr: SocketAddr = lookup_host((self.host.as_str(), self.port))
            .await?
            .next()
            .with_context(|| format!("cannot resolve {}", self.host))?;
        let (client, events, _ack) = connect_tcp(addr, self.config()?, None)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        Ok((client, events))
    }
}

/// Publishes one message.
#[derive(Debug, Args)]
pub(crate) struct PubArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Topic to publish to.
    #[arg(short, long)]
    topic: String,
    /// Payload (standard input if omitted).
    #[arg(short, long)]
    message: Option<String>,
    /// QoS.
    #[arg(short, long, default_value_t = 0)]
    qos: u8,
    /// Retain the message.
    #[arg(short, long)]
    retain: bool,
    /// Publish this many times.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
}

/// Subscribes and prints messages.
#[derive(Debug, Args)]
pub(crate) struct SubArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Topic filter; repeatable.
    #[arg(short, long, required = true)]
    topic: Vec<String>,
    /// QoS.
    #[arg(short, long, default_value_t = 0)]
    qos: u8,
    /// Print the topic before each payload.
    #[arg(short, long)]
    verbose: bool,
    /// Exit after this many messages.
    #[arg(short = 'C', long)]
    count: Option<u64>,
    /// Exit after this many seconds without a message.
    #[arg(short = 'W', long)]
    timeout: Option<u64>,
}

fn qos(value: u8) -> anyhow::Result<QoS> {
    QoS::from_bits(value).with_context(|| format!("QoS {value} is not 0, 1 or 2"))
}

pub(crate) async fn publish(args: PubArgs) -> anyhow::Result<()> {
    let payload = match &args.message {
        Some(m) => Bytes::from(m.clone()),
        None => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
            Bytes::from(buf)
        }
    };
    let topic = TopicName::try_from(args.topic.as_str()).context("topic")?;
    let qos = qos(args.qos)?;
    let (client, mut events) = args.connect.connect().await?;
    let mut done = 0;
    for _ in 0..args.repeat {
        let message = Message::new(topic.clone(), payload.clone(), qos, args.retain);
        match client.publish(message).await? {
            Enqueued::Sent | Enqueued::Queued => {}
            other => bail!("message not sent: {other:?}"),
        }
        // Confirmations taken as they come: the client stops reading while they wait.
        while let Some(event) = events.try_recv() {
            done += confirmed(Some(event))?;
        }
    }
    if qos != QoS::AtMostOnce {
        while done < args.repeat {
            done += confirmed(events.recv().await)?;
        }
    }
    client.disconnect(ReasonCode::Success, None).await?;
    Ok(())
}

/// 1 for a successful delivery confirmation, 0 for another event; an error for a refusal or
/// the end of the connection.
fn confirmed(event: Option<Event>) -> anyhow::Result<u32> {
    match event {
        Some(Event::Delivered { reason, .. }) if reason.is_error() => {
            bail!("the broker refused the message: {reason}")
        }
        Some(Event::Delivered { .. }) => Ok(1),
        Some(Event::Closed { reason, .. }) => bail!("connection closed: {reason}"),
        Some(_) => Ok(0),
        None => bail!("connection closed"),
    }
}

pub(crate) async fn subscribe(args: SubArgs) -> anyhow::Result<()> {
    let qos = qos(args.qos)?;
    let filters = args
        .topic
        .iter()
        .map(|t| {
            let filter =
                TopicFilter::try_from(t.as_str()).with_context(|| format!("filter {t}"))?;
            let options = SubscriptionOptions {
                qos,
                ..SubscriptionOptions::default()
            };
            Ok(Subscription { filter, options })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (client, mut events) = args.connect.connect().await?;
    let ack = client
        .subscribe(filters, SubscribeProperties::default())
        .await?;
    if ack.reasons.iter().all(|r| r.is_error()) {
        bail!("every subscription was refused: {:?}", ack.reasons);
    }
    let mut received = 0u64;
    let mut stdout = std::io::stdout().lock();
    loop {
        let next = events.next_message();
        let message = match args.timeout {
            Some(secs) => match tokio::time::timeout(Duration::from_secs(secs), next).await {
                Ok(m) => m,
                Err(_) => break,
            },
            None => next.await,
        };
        let Some(publish) = message else {
            bail!("connection closed")
        };
        if args.verbose {
            write!(stdout, "{} ", publish.message.topic)?;
        }
        stdout.write_all(&publish.message.payload)?;
        writeln!(stdout)?;
        stdout.flush()?;
        received += 1;
        if args.count.is_some_and(|c| received >= c) {
            break;
        }
    }
    client.disconnect(ReasonCode::Success, None).await?;
    Ok(())
}
