//! Reloading at runtime (SIGHUP in the binary, `POST /api/v1/reload` in the admin API).
//!
//! A reload reads the configuration again (through the [`ConfigSource`] the program gave the
//! builder, else it keeps the one the broker started with) and the files it names, in two
//! steps: first everything is loaded and checked (the configuration, the password and ACL
//! files, the certificates, the bridges, `[p2p]`'s allow-list), then, only if all of that
//! worked, applied. So a failed reload keeps the whole previous configuration. Settings that
//! cannot change while the broker runs (listeners, the data directory, queue sizes, ...) are listed
//! in the report as needing a restart; their old values stay in force.

use std::sync::{Arc, Weak};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::access::AccessControl;
use crate::broker::Inner;
use crate::config::Config;
use crate::tls::TlsAcceptor;

/// Reads the configuration again for a reload: the file, with whatever the program lays over
/// it (command-line flags, say). An error keeps the running configuration.
pub type ConfigSource = Arc<dyn Fn() -> Result<Config, String> + Send + Sync>;

/// Applies what the program itself owns (its log filter, say) once a reload has been applied;
/// returns the names of the parts it reloaded. It cannot fail: check in the [`ConfigSource`].
pub type ReloadHook = Arc<dyn Fn(&Config) -> Vec<String> + Send + Sync>;

/// What a reload did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct ReloadReport {
    /// Whether it was applied. When not, nothing changed.
    pub ok: bool,
    /// What was read again and is in force now: `config`, `access` (password and ACL files,
    /// `allow_anonymous`), `limits` (`max_retained_messages`, `max_retained_bytes`,
    /// `max_subscriptions`, `max_sessions`, `max_connection_rate`, `max_topic_length`,
    /// `max_topic_levels`: they apply to what comes next; nothing held already is dropped),
    /// `tls` (certificates, keys, CA), `bridges`, `p2p` (`allow`, `use_node_id_as_username`), and what the program applies itself (`mqttd`: `log_level`).
    /// The API keys are not listed: they are read again whenever
    /// their file changes.
    pub reloaded: Vec<String>,
    /// Bridges started, stopped or restarted with new settings, as `added NAME`,
    /// `removed NAME`, `restarted NAME`.
    pub bridges: Vec<String>,
    /// Settings that changed in the configuration and only take effect after a restart (the
    /// old values stay in force until then).
    pub restart_needed: Vec<String>,
    /// Why the reload failed, naming the part (`config`, `access`, `tls`, `bridges`, `p2p`)
    /// and the file. Empty when `ok`.
    pub errors: Vec<ReloadError>,
}

/// A part of a reload that failed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct ReloadError {
    /// `config`, `access`, `tls`, `bridges` or `p2p`.
    pub part: String,
    /// Why, naming the file.
    pub message: String,
}

impl ReloadReport {
    fn failed(mut self, part: &str, message: String) -> Self {
        self.ok = false;
        self.errors.push(ReloadError {
            part: part.to_owned(),
            message,
        });
        self
    }

    /// One line for people: the errors, or what was reloaded and what needs a restart.
    pub fn summary(&self) -> String {
        if !self.ok {
            let errors: Vec<String> = self
                .errors
                .iter()
                .map(|e| format!("{}: {}", e.part, e.message))
                .collect();
            return format!(
                "reload failed, the previous configuration stays: {}",
                errors.join("; ")
            );
        }
        let mut line = format!("reloaded {}", self.reloaded.join(", "));
        if !self.bridges.is_empty() {
            line.push_str(&format!(" (bridges: {})", self.bridges.join(", ")));
        }
        match self.restart_needed.is_empty() {
            true => line.push_str("; nothing needs a restart"),
            false => line.push_str(&format!(
                "; needs a restart to take effect: {}",
                self.restart_needed.join(", ")
            )),
        }
        line
    }
}

/// The broker's side of a reload: what it holds that a reload replaces.
pub(crate) struct Reloader {
    inner: Weak<Inner>,
    tls: Option<TlsAcceptor>,
    #[cfg(feature = "p2p")]
    p2p_allow: Option<mqttd_p2p::AllowList>,
    source: Option<ConfigSource>,
    hook: Option<ReloadHook>,
    /// One reload at a time: SIGHUP and the API may ask together.
    running: parking_lot::Mutex<()>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("tls", &self.tls.is_some())
            .field("source", &self.source.is_some())
            .finish_non_exhaustive()
    }
}

impl Reloader {
    pub(crate) fn new(
        inner: &Arc<Inner>,
        tls: Option<TlsAcceptor>,
        #[cfg(feature = "p2p")] p2p_allow: Option<mqttd_p2p::AllowList>,
        source: Option<ConfigSource>,
        hook: Option<ReloadHook>,
    ) -> Self {
        Self {
            inner: Arc::downgrade(inner),
            tls,
            #[cfg(feature = "p2p")]
            p2p_allow,
            source,
            hook,
            running: parking_lot::Mutex::new(()),
        }
    }

    /// Reloads, and logs one line with the outcome and what needs a restart.
    pub(crate) fn reload(&self) -> ReloadReport {
        let report = self.run();
        if report.ok {
            tracing::info!(
                reloaded = ?report.reloaded,
                bridges = ?report.bridges,
                restart_needed = ?report.restart_needed,
                "{}",
                report.summary()
            );
        } else {
            tracing::warn!(restart_needed = ?report.restart_needed, "{}", report.summary());
        }
        report
    }

    fn run(&self) -> ReloadReport {
        let _one = self.running.lock();
        let report = ReloadReport::default();
        let Some(inner) = self.inner.upgrade() else {
            return report.failed("config", "the broker has stopped".into());
        };
        // Step 1: load and check everything; nothing is applied yet.
        let config = match &self.source {
            Some(source) => match source() {
                Ok(config) => config,
                Err(error) => return report.failed("config", error),
            },
            None => inner.config.clone(),
        };
        let mut report = report;
        report.restart_needed = restart_needed(&inner.config, &config);
        if let Err(error) = config.listeners() {
            return report.failed("config", error.to_string());
        }
        let access = match AccessControl::load(&config) {
            Ok(access) => access,
            Err(error) => return report.failed("access", error.to_string()),
        };
        let tls = match &self.tls {
            Some(tls) => match tls.prepare() {
                Ok(prepared) => Some((tls, prepared)),
                Err(error) => return report.failed("tls", error.to_string()),
            },
            None => None,
        };
        #[cfg(feature = "p2p")]
        let allowed = match crate::listener::p2p::allowed(&config.p2p) {
            Ok(allowed) => allowed,
            Err(error) => return report.failed("p2p", error.to_string()),
        };
        // Step 2: the bridges check every new or changed one first and change nothing if one
        // cannot run; the rest below cannot fail.
        let mut names = std::collections::HashSet::new();
        if let Some(twice) = config.bridge.iter().find(|b| !names.insert(&b.name)) {
            return report.failed(
                "bridges",
                format!("bridge {:?}: two bridges have this name", twice.name),
            );
        }
        match inner.bridges.reload(&inner, &config.bridge) {
            Ok(changes) => {
                let named = |what: &str, names: &[String]| {
                    names
                        .iter()
                        .map(|n| format!("{what} {n}"))
                        .collect::<Vec<_>>()
                };
                report.bridges.extend(named("added", &changes.added));
                report.bridges.extend(named("removed", &changes.removed));
                report
                    .bridges
                    .extend(named("restarted", &changes.restarted));
            }
            Err((bridge, reason)) => {
                return report.failed("bridges", format!("bridge {bridge:?}: {reason}"))
            }
        }
        inner.auth.store(Arc::new(access));
        inner
            .limits
            .store(Arc::new(crate::broker::LiveLimits::of(&config)));
        inner.persistent_sessions.set_max(config.max_sessions);
        let mut reloaded = vec!["config", "access", "limits"];
        if let Some((tls, prepared)) = tls {
            tls.install(prepared);
            reloaded.push("tls");
        }
        reloaded.push("bridges");
        #[cfg(feature = "p2p")]
        if let Some(allow) = &self.p2p_allow {
            allow.set(allowed);
        }
        inner.node_id_as_username.store(
            config.p2p.use_node_id_as_username,
            std::sync::atomic::Ordering::Relaxed,
        );
        reloaded.push("p2p");
        if self.source.is_none() {
            reloaded.retain(|part| *part != "config" && *part != "limits");
        }
        report.reloaded = reloaded.into_iter().map(str::to_owned).collect();
        if let Some(hook) = &self.hook {
            report.reloaded.extend(hook(&config));
        }
        inner.loaded_config.store(Arc::new(config));
        report.ok = true;
        report
    }
}

/// The settings that differ between `running` and `new` and that a reload cannot apply.
pub(crate) fn restart_needed(running: &Config, new: &Config) -> Vec<String> {
    // No `..`: a new setting must be sorted into reloadable or not here to compile.
    let Config {
        listen,
        tls,
        quic,
        relay,
        p2p,
        data_dir,
        allow_anonymous: _,
        password_file: _,
        acl_file: _,
        max_keepalive,
        max_queued_messages,
        max_queued_bytes,
        max_inflight_messages,
        max_packet_size,
        receive_maximum,
        topic_alias_maximum,
        max_qos,
        retain_available,
        max_connections,
        max_connection_rate: _,
        connect_timeout,
        max_topic_length: _,
        max_topic_levels: _,
        max_subscriptions: _,
        max_retained_messages: _,
        max_retained_bytes: _,
        max_sessions: _,
        persistent_client_expiration,
        max_session_expiry,
        offline_qos0,
        sys_interval,
        persistence,
        durability,
        sync_interval_ms,
        log_level: _,
        bridge: _,
        cluster,
    } = new;
    let mut changed = Vec::new();
    // Debug output compares the settings whose types have no PartialEq.
    let mut check = |name: &str, old: &dyn std::fmt::Debug, new: &dyn std::fmt::Debug| {
        if format!("{old:?}") != format!("{new:?}") {
            changed.push(name.to_owned());
        }
    };
    check("listen", &running.listen, listen);
    check("tls", &running.tls, tls);
    check("quic", &running.quic, quic);
    check("relay", &running.relay, relay);
    // `allow` and `use_node_id_as_username` are reloaded; the node's other settings are not.
    check("p2p.relays", &running.p2p.relays, &p2p.relays);
    check(
        "p2p.relay_cafile",
        &running.p2p.relay_cafile,
        &p2p.relay_cafile,
    );
    check("p2p.bind", &running.p2p.bind, &p2p.bind);
    check("data_dir", &running.data_dir, data_dir);
    // The node's identity, listener, certificates and store are fixed for its life.
    check("cluster", &running.cluster, cluster);
    check("max_keepalive", &running.max_keepalive, max_keepalive);
    check(
        "max_queued_messages",
        &running.max_queued_messages,
        max_queued_messages,
    );
    check(
        "max_queued_bytes",
        &running.max_queued_bytes,
        max_queued_bytes,
    );
    check(
        "max_inflight_messages",
        &running.max_inflight_messages,
        max_inflight_messages,
    );
    check("max_packet_size", &running.max_packet_size, max_packet_size);
    check("receive_maximum", &running.receive_maximum, receive_maximum);
    check(
        "topic_alias_maximum",
        &running.topic_alias_maximum,
        topic_alias_maximum,
    );
    check("max_qos", &running.max_qos, max_qos);
    check(
        "retain_available",
        &running.retain_available,
        retain_available,
    );
    check("max_connections", &running.max_connections, max_connections);
    check("connect_timeout", &running.connect_timeout, connect_timeout);
    check(
        "persistent_client_expiration",
        &running.persistent_client_expiration,
        persistent_client_expiration,
    );
    check(
        "max_session_expiry",
        &running.max_session_expiry,
        max_session_expiry,
    );
    check("offline_qos0", &running.offline_qos0, offline_qos0);
    check("sys_interval", &running.sys_interval, sys_interval);
    check("persistence", &running.persistence, persistence);
    check("durability", &running.durability, durability);
    check(
        "sync_interval_ms",
        &running.sync_interval_ms,
        sync_interval_ms,
    );
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_settings_a_reload_cannot_apply_need_a_restart() {
        let running = Config::parse("listen = ['tcp://127.0.0.1:1883']").unwrap();
        let new = Config::parse(
            "listen = ['tcp://127.0.0.1:1884']\nmax_queued_messages = 5\n\
             password_file = 'p'\nallow_anonymous = true\nmax_subscriptions = 3\n\
             max_retained_messages = 4\nlog_level = 'debug'\n[p2p]\nallow = []\n",
        )
        .unwrap();
        assert_eq!(
            restart_needed(&running, &new),
            ["listen", "max_queued_messages"]
        );
        assert!(restart_needed(&running, &running.clone()).is_empty());
    }

    #[test]
    fn a_cluster_section_added_or_changed_needs_a_restart() {
        let section = "[cluster]\nnode_id = 1\nname = 'a'\nlisten = '127.0.0.1:1884'\n\
                       ca = 'ca.pem'\ncert = 'a.pem'\nkey = 'a.key'\n";
        let alone = Config::parse("").unwrap();
        let clustered = Config::parse(section).unwrap();
        let moved = Config::parse(&section.replace("1884", "1885")).unwrap();
        assert_eq!(restart_needed(&alone, &clustered), ["cluster"]);
        assert_eq!(restart_needed(&clustered, &moved), ["cluster"]);
        assert!(restart_needed(&clustered, &clustered.clone()).is_empty());
    }

    #[test]
    fn the_summary_names_the_errors_or_what_needs_a_restart() {
        let report = ReloadReport {
            ok: true,
            reloaded: vec!["config".into(), "access".into()],
            restart_needed: vec!["listen".into()],
            ..ReloadReport::default()
        };
        assert_eq!(
            report.summary(),
            "reloaded config, access; needs a restart to take effect: listen"
        );
        let failed = ReloadReport::default().failed("access", "bad file".into());
        assert!(failed
            .summary()
            .contains("previous configuration stays: access: bad file"));
    }
}
