//! The ACL file, with Mosquitto's `acl_file` syntax and semantics.
//!
//! ```text
//! # Lines before any `user` line apply to anonymous clients.
//! topic read public/#
//!
//! user alice
//! topic readwrite alice/#
//! topic deny alice/secret
//!
//! # Pattern lines apply to every client, wherever they appear.
//! pattern write devices/%c/status
//! pattern read users/%u/#
//! ```
//!
//! `topic [read|write|readwrite|deny] <topic>` grants (or denies) access to a topic filter;
//! without an access word the grant is `readwrite`, and a topic that contains spaces needs
//! the access word (`topic read` alone is read-write access to the topic `read`, as in
//! Mosquitto). `user <name>` starts that user's section (the user name as sent in CONNECT,
//! not the client id; a repeated section adds to the first). `pattern` lines take the same
//! form and substitute `%c` (client id) and `%u` (user name) when one of them forms a whole
//! topic level. `#` at the start of a line makes a comment.
//!
//! # Decisions, as Mosquitto's `security_default.c` makes them
//!
//! 1. The client's own list is checked first: its user section if it has a user name (a
//!    user with no section has no list), the anonymous entries if it has none. `deny`
//!    entries come first: a matching `deny` refuses; otherwise a matching entry that grants
//!    the access allows. An entry that matches but grants other access is passed over.
//! 2. If that decided nothing and there are pattern lines, a client whose user name or
//!    client id contains `+` or `#` is refused (it could otherwise widen a pattern), and the
//!    patterns are checked the same way, `deny` first.
//! 3. Anything not allowed is denied: a configured ACL file is an allow list.
//!
//! So a `deny` takes precedence within the list it is in, and a user's `topic` grant is
//! consulted before any `pattern deny`, exactly as in Mosquitto.
//!
//! Topic matching follows `mosquitto_topic_matches_sub`: `#` also matches the parent level
//! (`a/#` matches `a`), `+` matches one level, possibly empty, and a topic starting with `$`
//! matches only an entry starting with `$` (so `topic read #` does not grant `$SYS`; there is
//! no other special case for `$SYS`). The `$` rule looks at the entry as written, before
//! substitution, so a client id of `$SYS` cannot turn `%c/#` into `$SYS/#`. A `%c` or `%u`
//! level does not match when the value is empty or contains `/`, so a client id such as
//! `alice/x` cannot reach into `alice`'s levels (Mosquitto 2.1's pattern matcher does the
//! same; 2.0 substituted the string and would have let it).
//!
//! # Subscriptions
//!
//! Mosquitto's `acl_file` grants every SUBSCRIBE and filters at delivery. mqttd also checks
//! the filter at SUBSCRIBE time ([`Access::Subscribe`]), with the semantics of
//! `mosquitto_sub_matches_acl`: the subscription must lie entirely inside an entry that
//! grants `read` (`a/+/c` and `a/#` lie inside `a/#`; `#` does not lie inside `a/#`), and it is
//! refused if it lies entirely inside a `deny` entry. A subscription that overlaps a `deny`
//! entry only in part is allowed; [`Access::Read`] at delivery keeps the denied messages out.
//! A broker that wants Mosquitto's looser behaviour simply does not ask for `Subscribe`.
//! For a shared subscription (`$share/<group>/<filter>`) the filter is checked.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use super::{FileError, FileKind};

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Receive a message published to this topic name.
    Read,
    /// Publish to this topic name.
    Write,
    /// Subscribe with this topic filter.
    Subscribe,
}

/// The client an ACL decision is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AclSubject<'a> {
    /// The client identifier (the one the server assigned, if the client sent none).
    pub client_id: &'a str,
    /// The user name from CONNECT, if any.
    pub username: Option<&'a str>,
}

/// A parsed ACL file.
#[derive(Debug, Clone, Default)]
pub struct AclFile {
    anonymous: Rules,
    users: HashMap<String, Rules>,
    patterns: Rules,
}

/// One list of entries, `deny` entries kept apart because they are checked first.
#[derive(Debug, Clone, Default)]
struct Rules {
    deny: Vec<Rule>,
    allow: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    /// Only read and write bits matter; `deny` rules live in their own list.
    read: bool,
    write: bool,
    /// Whether the entry, as written, starts with `$`.
    system: bool,
    levels: Box<[Level]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(Box<str>),
    Plus,
    Hash,
    ClientId,
    Username,
}

/// What the entry is matched against.
#[derive(Clone, Copy)]
enum Target<'a> {
    /// A topic name (no wildcards), for read and write.
    Topic(&'a str),
    /// A topic filter, for subscribe.
    Filter(&'a str),
}

impl Target<'_> {
    fn text(&self) -> &str {
        match self {
            Self::Topic(t) | Self::Filter(t) => t,
        }
    }
}

impl Rule {
    fn grants(&self, access: Access) -> bool {
        match access {
            Access::Read | Access::Subscribe => self.read,
            Access::Write => self.write,
        }
    }

    fn matches(&self, target: Target<'_>, subject: Option<&AclSubject<'_>>) -> bool {
        let text = target.text();
        if self.system != text.starts_with('$') {
            return false;
        }
        let is_filter = matches!(target, Target::Filter(_));
        let mut levels = text.split('/');
        for rule_level in self.levels.iter() {
            // `#` covers whatever is left, including nothing: `a/#` matches `a`.
            if *rule_level == Level::Hash {
                return true;
            }
            let Some(level) = levels.next() else {
                return false;
            };
            let ok = match rule_level {
                Level::Literal(literal) => **literal == *level,
                // In a filter, `+` covers a `+` but not a `#`, which spans several levels.
                Level::Plus => !(is_filter && level == "#"),
                Level::ClientId => substitute(subject.map(|s| s.client_id), level),
                Level::Username => substitute(subject.and_then(|s| s.username), level),
                Level::Hash => true,
            };
            if !ok {
                return false;
            }
        }
        levels.next().is_none()
    }
}

/// Whether a `%c`/`%u` level, replaced by `value`, equals `level`. An empty value or one
/// containing `/` never matches: it would not be one level.
fn substitute(value: Option<&str>, level: &str) -> bool {
    match value {
        Some(value) => !value.is_empty() && !value.contains('/') && value == level,
        None => false,
    }
}

impl Rules {
    fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty()
    }

    /// `Some(allowed)` if an entry decides, `None` if none matches.
    fn decide(
        &self,
        target: Target<'_>,
        access: Access,
        subject: Option<&AclSubject<'_>>,
    ) -> Option<bool> {
        if self.deny.iter().any(|r| r.matches(target, subject)) {
            return Some(false);
        }
        self.allow
            .iter()
            .any(|r| r.grants(access) && r.matches(target, subject))
            .then_some(true)
    }

    fn push(&mut self, rule: Rule, deny: bool) {
        if deny {
            self.deny.push(rule);
        } else {
            self.allow.push(rule);
        }
    }
}

impl AclFile {
    /// Reads and parses the file at `path`. Errors name the path, and the line if the content
    /// is at fault.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, AclFileError> {
        let path = path.as_ref();
        let text = fs::read_to_string(path).map_err(|source| AclFileError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| e.with_path(path))
    }

    /// Parses the content of an ACL file. Errors carry the line number.
    pub fn parse(text: &str) -> Result<Self, AclFileError> {
        let mut acl = Self::default();
        let mut user: Option<String> = None;
        for (number, raw) in text.lines().enumerate() {
            let error = |error| AclFileError::Line {
                path: None,
                line: number + 1,
                error,
            };
            let body = raw.trim();
            if body.is_empty() || body.starts_with('#') {
                continue;
            }
            let (keyword, rest) = split_word(body);
            match keyword {
                "topic" | "pattern" => {
                    let (access, topic) = split_word(rest);
                    if access.is_empty() {
                        return Err(error(AclLineError::MissingTopic));
                    }
                    // `topic foo` grants readwrite to `foo`; with two words the first is the
                    // access (Mosquitto's reading, which also makes `topic read` a topic).
                    let (access, topic) = if topic.is_empty() {
                        ("readwrite", access)
                    } else {
                        (access, topic)
                    };
                    let (read, write, deny) = match access {
                        "read" => (true, false, false),
                        "write" => (false, true, false),
                        "readwrite" => (true, true, false),
                        "deny" => (false, false, true),
                        other => return Err(error(AclLineError::InvalidAccess(other.to_owned()))),
                    };
                    let pattern = keyword == "pattern";
                    let levels = compile(topic, pattern).map_err(error)?;
                    let rule = Rule {
                        read,
                        write,
                        system: topic.starts_with('$'),
                        levels,
                    };
                    let rules = match (&user, pattern) {
                        (_, true) => &mut acl.patterns,
                        (None, false) => &mut acl.anonymous,
                        (Some(user), false) => acl.users.entry(user.clone()).or_default(),
                    };
                    rules.push(rule, deny);
                }
                "user" => {
                    if rest.is_empty() {
                        return Err(error(AclLineError::MissingUsername));
                    }
                    user = Some(rest.to_owned());
                }
                other => return Err(error(AclLineError::UnknownKeyword(other.to_owned()))),
            }
        }
        Ok(acl)
    }

    /// Whether `client` may have `access` to `topic`: a topic name for [`Access::Read`] and
    /// [`Access::Write`], a topic filter (shared or not) for [`Access::Subscribe`]. A topic
    /// that is not valid for the access asked (a wildcard in a topic name, a misplaced
    /// wildcard in a filter, an empty string) is denied.
    pub fn check(&self, client: &AclSubject<'_>, access: Access, topic: &str) -> bool {
        let Some(target) = target(access, topic) else {
            return false;
        };
        let own = match client.username {
            Some(user) => self.users.get(user),
            None => Some(&self.anonymous),
        };
        if let Some(decision) = own.and_then(|rules| rules.decide(target, access, None)) {
            return decision;
        }
        if self.patterns.is_empty() {
            return false;
        }
        // Mosquitto: "a malicious client may configure its username/client id to bypass ACL
        // checks"; with patterns in play, such a client gets nothing from them.
        let dangerous = |s: &str| s.contains(['+', '#']);
        if dangerous(client.client_id) || client.username.is_some_and(dangerous) {
            return false;
        }
        self.patterns
            .decide(target, access, Some(client))
            .unwrap_or(false)
    }
}

/// Validates `topic` for `access`; `None` if it is not a valid topic name or filter.
fn target(access: Access, topic: &str) -> Option<Target<'_>> {
    match access {
        Access::Read | Access::Write => {
            let valid = !topic.is_empty() && !topic.contains(['+', '#']);
            valid.then_some(Target::Topic(topic))
        }
        Access::Subscribe => {
            let filter = match topic.strip_prefix("$share/") {
                Some(rest) => {
                    let (group, filter) = rest.split_once('/')?;
                    if group.is_empty() || group.contains(['+', '#']) {
                        return None;
                    }
                    filter
                }
                None => topic,
            };
            valid_filter(filter).then_some(Target::Filter(filter))
        }
    }
}

/// Non-empty, `+` and `#` only as whole levels, `#` only last.
fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let wild = level.contains(['+', '#']);
        if wild && level != "+" && !(level == "#" && levels.peek().is_none()) {
            return false;
        }
    }
    true
}

/// Splits off the first word (up to a space or tab) and returns it with the trimmed rest.
fn split_word(s: &str) -> (&str, &str) {
    match s.split_once([' ', '\t']) {
        Some((word, rest)) => (word, rest.trim()),
        None => (s, ""),
    }
}

fn compile(topic: &str, pattern: bool) -> Result<Box<[Level]>, AclLineError> {
    if !valid_filter(topic) || topic.len() > usize::from(u16::MAX) {
        return Err(AclLineError::InvalidTopic(topic.to_owned()));
    }
    Ok(topic
        .split('/')
        .map(|level| match level {
            "+" => Level::Plus,
            "#" => Level::Hash,
            // Only a whole level is substituted; `%count` stays literal, as Mosquitto
            // documents ("the substitution pattern must be the only text for that level").
            "%c" if pattern => Level::ClientId,
            "%u" if pattern => Level::Username,
            literal => Level::Literal(literal.into()),
        })
        .collect())
}

/// Why an ACL file could not be loaded or parsed.
pub type AclFileError = FileError<AclLineError>;

impl FileKind for AclLineError {
    const NAME: &'static str = "ACL file";
}

/// What is wrong with one line of an ACL file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AclLineError {
    /// The line starts with something other than `topic`, `pattern` or `user`.
    #[error("unknown keyword {0:?} (expected topic, pattern or user)")]
    UnknownKeyword(String),
    /// A `topic` or `pattern` line names no topic.
    #[error("missing topic")]
    MissingTopic,
    /// The access word is not `read`, `write`, `readwrite` or `deny`.
    #[error("invalid access {0:?} (expected read, write, readwrite or deny)")]
    InvalidAccess(String),
    /// The topic is not a valid topic filter.
    #[error("invalid topic filter {0:?}")]
    InvalidTopic(String),
    /// A `user` line names no user.
    #[error("missing user name")]
    MissingUsername,
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANON: AclSubject<'static> = AclSubject {
        client_id: "anon-client",
        username: None,
    };

    fn user(name: &'static str) -> AclSubject<'static> {
        AclSubject {
            client_id: "client",
            username: Some(name),
        }
    }

    fn client(client_id: &'static str, username: Option<&'static str>) -> AclSubject<'static> {
        AclSubject {
            client_id,
            username,
        }
    }

    use Access::{Read, Subscribe, Write};

    #[test]
    fn anonymous_section_applies_only_to_anonymous_clients() {
        let acl = AclFile::parse(
            "topic read public/#\n\
             topic write inbox\n\
             user alice\n\
             topic readwrite alice/#\n",
        )
        .unwrap();
        assert!(acl.check(&ANON, Read, "public/news"));
        assert!(acl.check(&ANON, Read, "public"), "a/# covers a");
        assert!(!acl.check(&ANON, Write, "public/news"));
        assert!(acl.check(&ANON, Write, "inbox"));
        assert!(!acl.check(&ANON, Read, "inbox"));
        assert!(!acl.check(&ANON, Read, "alice/x"));

        // A named user does not get the anonymous entries...
        assert!(!acl.check(&user("alice"), Read, "public/news"));
        assert!(acl.check(&user("alice"), Write, "alice/x"));
        // ...and a user without a section gets nothing.
        assert!(!acl.check(&user("bob"), Read, "public/news"));
        assert!(!acl.check(&user("bob"), Read, "alice/x"));
    }

    #[test]
    fn read_and_write_are_separate() {
        let acl = AclFile::parse(
            "user u\n\
             topic read r\n\
             topic write w\n\
             topic rw\n\
             topic readwrite rw2\n",
        )
        .unwrap();
        let u = user("u");
        assert!(acl.check(&u, Read, "r") && !acl.check(&u, Write, "r"));
        assert!(!acl.check(&u, Read, "w") && acl.check(&u, Write, "w"));
        assert!(acl.check(&u, Read, "rw") && acl.check(&u, Write, "rw"));
        assert!(acl.check(&u, Read, "rw2") && acl.check(&u, Write, "rw2"));
    }

    #[test]
    fn deny_takes_precedence_within_a_list() {
        let acl = AclFile::parse(
            "user alice\n\
             topic readwrite alice/#\n\
             topic deny alice/secret\n\
             topic deny alice/+/private\n",
        )
        .unwrap();
        let a = user("alice");
        assert!(acl.check(&a, Write, "alice/open"));
        assert!(!acl.check(&a, Read, "alice/secret"));
        assert!(!acl.check(&a, Write, "alice/secret"));
        assert!(!acl.check(&a, Read, "alice/x/private"));
        assert!(acl.check(&a, Read, "alice/secret/sub"));
    }

    #[test]
    fn user_grant_is_consulted_before_pattern_deny() {
        // Mosquitto checks the user's list before the patterns, so its grant wins.
        let acl = AclFile::parse(
            "pattern deny shared/#\n\
             user admin\n\
             topic readwrite shared/#\n",
        )
        .unwrap();
        assert!(acl.check(&user("admin"), Write, "shared/x"));
        assert!(!acl.check(&user("other"), Write, "shared/x"));
        // And a user deny is final, even when a pattern would grant.
        let acl = AclFile::parse(
            "pattern readwrite %u/#\n\
             user eve\n\
             topic deny eve/locked\n",
        )
        .unwrap();
        assert!(acl.check(&user("eve"), Write, "eve/open"));
        assert!(!acl.check(&user("eve"), Write, "eve/locked"));
    }

    #[test]
    fn patterns_substitute_client_id_and_username() {
        let acl = AclFile::parse(
            "user alice\n\
             pattern write devices/%c/status\n\
             pattern read users/%u/#\n\
             pattern read literal/%count\n",
        )
        .unwrap();
        let c = client("dev1", Some("alice"));
        assert!(acl.check(&c, Write, "devices/dev1/status"));
        assert!(!acl.check(&c, Write, "devices/dev2/status"));
        assert!(!acl.check(&c, Read, "devices/dev1/status"));
        assert!(acl.check(&c, Read, "users/alice/inbox"));
        assert!(acl.check(&c, Read, "users/alice"));
        assert!(!acl.check(&c, Read, "users/bob/inbox"));
        // Patterns apply to every client, section or not, and to anonymous ones (except %u).
        let anon = client("dev2", None);
        assert!(acl.check(&anon, Write, "devices/dev2/status"));
        assert!(!acl.check(&anon, Read, "users//inbox"));
        // %c only as a whole level.
        assert!(acl.check(&c, Read, "literal/%count"));
        assert!(!acl.check(&c, Read, "literal/dev1ount"));
    }

    #[test]
    fn wildcards_in_ids_cannot_widen_patterns() {
        let acl = AclFile::parse("pattern readwrite devices/%c/#\npattern read %u/#\n").unwrap();
        // A client id of `+` or `#` would otherwise match every device.
        for id in ["+", "#", "a+", "x#"] {
            assert!(
                !acl.check(&client(id, None), Write, "devices/other/x"),
                "{id}"
            );
            assert!(!acl.check(&client(id, None), Write, &format!("devices/{id}/x")));
        }
        assert!(!acl.check(&client("ok", Some("+")), Read, "anyone/x"));
        // With a harmless user name but a dangerous client id, patterns are off entirely.
        assert!(!acl.check(&client("#", Some("bob")), Read, "bob/x"));
        assert!(acl.check(&client("ok", Some("bob")), Read, "bob/x"));
    }

    #[test]
    fn slash_in_ids_does_not_match_a_level() {
        let acl = AclFile::parse("pattern readwrite devices/%c/#\n").unwrap();
        // "alice/x" would make devices/alice/x/#, a part of device alice's space.
        let c = client("alice/x", None);
        assert!(!acl.check(&c, Write, "devices/alice/x/y"));
        assert!(!acl.check(&c, Write, "devices/alice/x"));
        // Empty ids never match.
        assert!(!acl.check(&client("", None), Write, "devices//x"));
    }

    #[test]
    fn dangerous_ids_do_not_lose_their_user_entries() {
        // Mosquitto checks the user's own list before refusing dangerous ids.
        let acl = AclFile::parse("user bob\ntopic read bob/#\npattern read %c/#\n").unwrap();
        assert!(acl.check(&client("#", Some("bob")), Read, "bob/x"));
    }

    #[test]
    fn dollar_topics_need_dollar_entries() {
        let acl = AclFile::parse(
            "topic read #\n\
             topic read +/x\n\
             topic read $SYS/broker/uptime\n\
             pattern read %c/#\n",
        )
        .unwrap();
        assert!(acl.check(&ANON, Read, "anything/at/all"));
        assert!(!acl.check(&ANON, Read, "$SYS/broker/load"));
        assert!(!acl.check(&ANON, Read, "$x"));
        assert!(acl.check(&ANON, Read, "$SYS/broker/uptime"));
        // A client id of `$SYS` does not turn `%c/#` into `$SYS/#`.
        assert!(!acl.check(&client("$SYS", None), Read, "$SYS/broker/load"));
    }

    #[test]
    fn topic_matching_follows_mosquitto() {
        let acl =
            AclFile::parse("topic a/+/#\ntopic b/+\ntopic +/+\ntopic c/#\ntopic /lead\n").unwrap();
        for (topic, expected) in [
            ("a/b", true), // `a/+/#` matches a/b: `#` covers the parent level
            ("a", false),  // ...but not a: `+` needs a level
            ("a/b/c/d", true),
            ("b/x", true),
            ("b/", true), // `+` matches an empty level
            ("b/x/y", false),
            ("x/y", true), // `+/+`
            ("/", true),   // two empty levels
            ("c", true),
            ("/lead", true),
            ("lead", false),
            ("q", false),
        ] {
            assert_eq!(acl.check(&ANON, Read, topic), expected, "{topic}");
        }
    }

    #[test]
    fn subscribe_needs_an_entry_covering_the_filter() {
        let acl = AclFile::parse(
            "user u\n\
             topic read a/#\n\
             topic read b/+/c\n\
             topic write w/#\n\
             topic deny a/secret/#\n",
        )
        .unwrap();
        let u = user("u");
        for (filter, expected) in [
            ("a/#", true),
            ("a/+", true),
            ("a/x/y", true),
            ("a", true),
            ("#", false), // wider than a/#
            ("+/x", false),
            ("b/+/c", true),
            ("b/x/c", true),
            ("b/#", false),
            ("b/+/+", false),
            ("w/x", false), // write-only
            ("a/secret/x", false),
            ("a/secret/#", false),
            ("a/secret", false), // a/secret/# covers its parent level too
            ("a/secretive", true),
            ("$share/g/a/+", true),
            ("$share/g/#", false),
            ("$share//a/+", false),
            ("a/#/b", false), // invalid filter
            ("a/b+", false),
            ("", false),
        ] {
            assert_eq!(acl.check(&u, Subscribe, filter), expected, "{filter}");
        }
        // Partial overlap with a deny is allowed; Read filters at delivery.
        assert!(acl.check(&u, Subscribe, "a/#"));
        assert!(!acl.check(&u, Read, "a/secret/x"));
    }

    #[test]
    fn subscribe_with_patterns() {
        let acl = AclFile::parse("pattern read sensors/%c/+\n").unwrap();
        let c = client("kitchen", None);
        assert!(acl.check(&c, Subscribe, "sensors/kitchen/temperature"));
        assert!(acl.check(&c, Subscribe, "sensors/kitchen/+"));
        assert!(!acl.check(&c, Subscribe, "sensors/kitchen/#"));
        assert!(!acl.check(&c, Subscribe, "sensors/+/temperature"));
        assert!(!acl.check(&c, Subscribe, "sensors/bathroom/temperature"));
        assert!(!acl.check(&client("+", None), Subscribe, "sensors/+/x"));
    }

    #[test]
    fn subscribe_dollar_rule() {
        let acl = AclFile::parse("topic read #\ntopic read $SYS/#\n").unwrap();
        assert!(acl.check(&ANON, Subscribe, "#"));
        assert!(acl.check(&ANON, Subscribe, "$SYS/broker/#"));
        let acl = AclFile::parse("topic read #\n").unwrap();
        assert!(!acl.check(&ANON, Subscribe, "$SYS/#"));
    }

    #[test]
    fn invalid_topics_are_denied() {
        let acl = AclFile::parse("topic #\n").unwrap();
        assert!(acl.check(&ANON, Write, "x"));
        assert!(!acl.check(&ANON, Write, "x/+"));
        assert!(!acl.check(&ANON, Read, "#"));
        assert!(!acl.check(&ANON, Read, ""));
    }

    #[test]
    fn empty_file_denies_everything() {
        let acl = AclFile::parse("# nothing\n\n").unwrap();
        assert!(!acl.check(&ANON, Read, "x"));
        assert!(!acl.check(&user("u"), Write, "x"));
        assert!(!acl.check(&ANON, Subscribe, "#"));
    }

    #[test]
    fn syntax_follows_mosquitto() {
        let acl = AclFile::parse(
            "  # indented comment\n\
             topic read\n\
             topic read spaced topic name  \n\
             user  bob smith \n\
             topic\twrite\tbob\n\
             user alice\n\
             topic alice/#\n\
             user bob smith\n\
             topic read more\n",
        )
        .unwrap();
        // `topic read` is read-write access to the topic `read`.
        assert!(acl.check(&ANON, Write, "read"));
        assert!(acl.check(&ANON, Read, "spaced topic name"));
        assert!(!acl.check(&ANON, Write, "spaced topic name"));
        let bob = user("bob smith");
        assert!(acl.check(&bob, Write, "bob"));
        // A repeated section adds to the first.
        assert!(acl.check(&bob, Read, "more"));
        assert!(acl.check(&user("alice"), Write, "alice/x"));
        // %c in a `topic` line is literal.
        let acl = AclFile::parse("topic read %c/x\n").unwrap();
        assert!(acl.check(&client("me", None), Read, "%c/x"));
        assert!(!acl.check(&client("me", None), Read, "me/x"));
    }

    #[test]
    fn parse_errors_name_the_line() {
        for (text, line, expected) in [
            ("bogus x\n", 1, AclLineError::UnknownKeyword("bogus".into())),
            ("# c\ntopic\n", 2, AclLineError::MissingTopic),
            (
                "topic maybe a/b\n",
                1,
                AclLineError::InvalidAccess("maybe".into()),
            ),
            (
                "topic read a/#/b\n",
                1,
                AclLineError::InvalidTopic("a/#/b".into()),
            ),
            (
                "pattern read a+\n",
                1,
                AclLineError::InvalidTopic("a+".into()),
            ),
            ("\n\nuser\n", 3, AclLineError::MissingUsername),
            (
                "Topic read a\n",
                1,
                AclLineError::UnknownKeyword("Topic".into()),
            ),
        ] {
            let err = AclFile::parse(text).unwrap_err();
            match &err {
                AclFileError::Line {
                    path: None,
                    line: l,
                    error,
                } => {
                    assert_eq!(*l, line, "{text:?}");
                    assert_eq!(*error, expected, "{text:?}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
            assert!(
                err.to_string().starts_with(&format!("line {line}: ")),
                "{err}"
            );
        }
    }

    #[test]
    fn load_errors_name_the_path_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acl");
        fs::write(&path, "topic read a\ntopic nope a\n").unwrap();
        let err = AclFile::load(&path).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("{}:2: ", path.display())),
            "{err}"
        );
        fs::write(&path, "user a\ntopic read a/#\n").unwrap();
        let acl = AclFile::load(&path).unwrap();
        assert!(acl.check(&user("a"), Read, "a/b"));
        let err = AclFile::load(dir.path().join("missing")).unwrap_err();
        assert!(matches!(err, AclFileError::Io { .. }));
    }
}
