//! Connection strings and the cluster prefix, checked at start-up.
//!
//! Every form the seed lists is accepted, and anything else is refused with an error that names
//! the problem. Passwords never appear in `Display`, `Debug` or error messages.
//!
//! ```
//! use hybrid_cluster_core::{AmqpUrl, ClusterPrefix, RedisUrl};
//!
//! let redis: RedisUrl = "redis://s3cret@localhost:6379".parse()?;
//! assert_eq!(redis.password(), Some("s3cret"));
//! assert_eq!(redis.to_string(), "redis://:***@localhost:6379/0");
//!
//! let amqp: AmqpUrl = "amqp://guest:guest@localhost:5672/%2f".parse()?;
//! assert_eq!(amqp.vhost(), "/");
//!
//! assert_eq!(ClusterPrefix::default().as_str(), "websocket:cluster");
//! assert!("bad {prefix}".parse::<ClusterPrefix>().is_err());
//! # Ok::<(), hybrid_cluster_core::ConfigError>(())
//! ```

use std::fmt;
use std::str::FromStr;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use url::Url;

/// A configuration value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A Redis connection string was refused.
    #[error("invalid Redis connection string {input:?}: {reason}")]
    Redis {
        /// The string, with any password hidden.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An AMQP connection string was refused.
    #[error("invalid AMQP connection string {input:?}: {reason}")]
    Amqp {
        /// The string, with any password hidden.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A cluster prefix was refused.
    #[error("invalid cluster prefix {prefix:?}: {reason}")]
    Prefix {
        /// The prefix.
        prefix: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A cluster secret was refused. The message names where it came from, never its value.
    #[error("invalid cluster secret from {origin}: {reason}")]
    Secret {
        /// Where the secret came from: `configuration`, or `environment variable {name}`.
        origin: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Hides the user-info part of a URL-like string (`scheme://user:pass@host` becomes
/// `scheme://***@host`), for messages about strings that may not parse.
fn redact(input: &str) -> String {
    let (scheme, rest) = match input.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, input),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let rest = match rest[..authority_end].rfind('@') {
        Some(at) => format!("***{}", &rest[at..]),
        None => rest.to_owned(),
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{rest}"),
        None => rest,
    }
}

fn decode(component: &str) -> Result<String, &'static str> {
    percent_decode_str(component)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| "a percent-encoded part is not valid UTF-8")
}

/// Characters left as they are in user names, passwords and virtual hosts: RFC 3986's
/// unreserved set.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn encode(component: &str) -> String {
    utf8_percent_encode(component, COMPONENT).to_string()
}

/// What Redis and AMQP connection strings share, read and checked the same way for both.
struct Endpoint {
    url: Url,
    tls: bool,
    host: String,
    port: u16,
    /// The user-info's name part, percent-decoded (empty when there is none).
    user: String,
    /// The user-info's password part, percent-decoded.
    password: Option<String>,
}

impl Endpoint {
    /// Parses `input` as a URL with one of `schemes` (plain, then TLS), a host, and a port
    /// (`default_ports[tls]` when it names none). The error is the reason, for the caller's
    /// [`ConfigError`].
    fn parse(input: &str, schemes: [&str; 2], default_ports: [u16; 2]) -> Result<Self, String> {
        let url = Url::parse(input).map_err(|e| e.to_string())?;
        let [plain, secure] = schemes;
        let tls = match url.scheme() {
            scheme if scheme == plain => false,
            scheme if scheme == secure => true,
            other => {
                return Err(format!(
                    "unsupported scheme `{other}` (expected {plain}:// or {secure}://)"
                ));
            }
        };
        let host = match url.host() {
            Some(url::Host::Ipv6(addr)) => addr.to_string(),
            Some(host) => host.to_string(),
            None => return Err("the host is missing".to_owned()),
        };
        if host.is_empty() {
            return Err("the host is missing".to_owned());
        }
        let port = url.port().unwrap_or(default_ports[usize::from(tls)]);
        if port == 0 {
            return Err("port 0 is not a port to connect to".to_owned());
        }
        let user = decode(url.username())?;
        let password = url.password().map(decode).transpose()?;
        Ok(Self {
            url,
            tls,
            host,
            port,
            user,
            password,
        })
    }
}

/// A Redis connection string.
///
/// Accepted forms: `localhost:6379`, `localhost` (port 6379), `redis://localhost:6379`,
/// `redis://password@localhost:6379` (the seed's password-only form),
/// `redis://user:password@localhost:6379`, `redis://:password@localhost:6379`, `rediss://…`
/// for TLS, each optionally ending in `/DB` (a database number, default 0). IPv6 hosts go in
/// brackets: `[::1]:6379`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    tls: bool,
    host: String,
    port: u16,
    username: Option<String>,
    password: Option<String>,
    db: u32,
}

impl RedisUrl {
    /// The default port.
    pub const DEFAULT_PORT: u16 = 6379;

    /// Whether the connection uses TLS (`rediss://`).
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// The host name or address (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The ACL user name, if one was given.
    pub fn username(&self) -> Option<&str> {
        self.username.as_deref()
    }

    /// The password, if one was given.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// The database number.
    pub fn db(&self) -> u32 {
        self.db
    }

    /// The full URL in the `redis://[user][:password@]host:port/db` form client libraries take,
    /// password included. Do not log it.
    pub fn to_connection_string(&self) -> String {
        self.render(true)
    }

    fn render(&self, with_password: bool) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let user = self.username.as_deref().map(encode).unwrap_or_default();
        let auth = match (&self.password, with_password) {
            (Some(password), true) => format!("{user}:{}@", encode(password)),
            (Some(_), false) => format!("{user}:***@"),
            (None, _) if !user.is_empty() => format!("{user}@"),
            (None, _) => String::new(),
        };
        format!("{scheme}://{auth}{host}:{}/{}", self.port, self.db)
    }
}

impl FromStr for RedisUrl {
    type Err = ConfigError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| ConfigError::Redis {
            input: redact(input),
            reason: reason.to_owned(),
        };
        let input = input.trim();
        if input.is_empty() {
            return Err(fail("it is empty"));
        }
        let with_scheme = if input.contains("://") {
            input.to_owned()
        } else {
            format!("redis://{input}")
        };
        let Endpoint {
            url,
            tls,
            host,
            port,
            user,
            password,
        } = Endpoint::parse(&with_scheme, ["redis", "rediss"], [Self::DEFAULT_PORT; 2])
            .map_err(|reason| fail(&reason))?;
        // The seed's `redis://password@host` puts the password where a URL has its user name.
        let (username, password) = match (user.is_empty(), password) {
            (true, password) => (None, password),
            (false, None) => (None, Some(user)),
            (false, Some(password)) => (Some(user), Some(password)),
        };
        let db = match url.path().trim_start_matches('/') {
            "" => 0,
            db => db
                .parse()
                .map_err(|_| fail("the path must be a database number, like /0"))?,
        };
        if url.query().is_some() || url.fragment().is_some() {
            return Err(fail("query parameters and fragments are not supported"));
        }
        Ok(Self {
            tls,
            host,
            port,
            username,
            password,
            db,
        })
    }
}

impl fmt::Display for RedisUrl {
    /// The URL with the password hidden.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(false))
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({self})")
    }
}

/// An AMQP connection string: `amqp://user:pass@host:port/vhost`, or `amqps://…` for TLS.
///
/// The user and password default to `guest`, the port to 5672 (5671 for `amqps`), and the
/// virtual host to `/`; a path of `/` or `/%2f` names the default virtual host `/`, and any
/// other path names a virtual host (percent-encoded). The query parameters `heartbeat`,
/// `connection_timeout`, `channel_max` and `frame_max` (numbers) are passed on to the client;
/// others are refused.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl {
    tls: bool,
    host: String,
    port: u16,
    username: String,
    password: String,
    vhost: String,
    query: Vec<(String, u64)>,
}

impl AmqpUrl {
    const QUERY_KEYS: [&'static str; 4] = [
        "heartbeat",
        "connection_timeout",
        "channel_max",
        "frame_max",
    ];

    /// The query parameters passed on to the client, checked: known keys, numeric values.
    fn client_parameters(url: &Url) -> Result<Vec<(String, u64)>, String> {
        let mut query = Vec::new();
        for (key, value) in url.query_pairs() {
            if !Self::QUERY_KEYS.contains(&key.as_ref()) {
                return Err(format!(
                    "unknown query parameter `{key}` (known: heartbeat, connection_timeout, channel_max, frame_max)"
                ));
            }
            let value = value
                .parse()
                .map_err(|_| format!("query parameter `{key}` must be a number"))?;
            query.push((key.into_owned(), value));
        }
        Ok(query)
    }

    /// Whether the connection uses TLS (`amqps://`).
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// The host name or address (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The user name.
    pub fn username(&self) -> &str {
        &self.username
    }

    /// The password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The virtual host.
    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    /// The full URL in the form client libraries take, password included. Do not log it.
    pub fn to_connection_string(&self) -> String {
        self.render(true)
    }

    fn render(&self, with_password: bool) -> String {
        let scheme = if self.tls { "amqps" } else { "amqp" };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let password = if with_password {
            encode(&self.password)
        } else {
            "***".to_owned()
        };
        let mut url = format!(
            "{scheme}://{}:{password}@{host}:{}/{}",
            encode(&self.username),
            self.port,
            encode(&self.vhost)
        );
        for (i, (key, value)) in self.query.iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&format!("{key}={value}"));
        }
        url
    }
}

impl FromStr for AmqpUrl {
    type Err = ConfigError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| ConfigError::Amqp {
            input: redact(input),
            reason: reason.to_owned(),
        };
        let input = input.trim();
        if input.is_empty() {
            return Err(fail("it is empty"));
        }
        if !input.contains("://") {
            return Err(fail("the scheme is missing (expected amqp:// or amqps://)"));
        }
        let Endpoint {
            url,
            tls,
            host,
            port,
            user,
            password,
        } = Endpoint::parse(input, ["amqp", "amqps"], [5672, 5671])
            .map_err(|reason| fail(&reason))?;
        let username = if user.is_empty() {
            "guest".to_owned()
        } else {
            user
        };
        let password = password.unwrap_or_else(|| "guest".to_owned());
        let path = url.path();
        let raw_vhost = path.strip_prefix('/').unwrap_or(path);
        if raw_vhost.contains('/') {
            return Err(fail(
                "the virtual host must be one path segment (write `/` inside it as %2f)",
            ));
        }
        let vhost = match decode(raw_vhost).map_err(fail)? {
            vhost if vhost.is_empty() => "/".to_owned(),
            vhost => vhost,
        };
        let query = Self::client_parameters(&url).map_err(|reason| fail(&reason))?;
        if url.fragment().is_some() {
            return Err(fail("fragments are not supported"));
        }
        Ok(Self {
            tls,
            host,
            port,
            username,
            password,
            vhost,
            query,
        })
    }
}

impl fmt::Display for AmqpUrl {
    /// The URL with the password hidden.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(false))
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AmqpUrl({self})")
    }
}

/// The prefix of every name a cluster uses in its backends (Redis keys, the AMQP exchange and
/// queues), so that several clusters can share one Redis and one RabbitMQ.
///
/// The default is the seed's `websocket:cluster`. A prefix is 1 to 128 printable ASCII
/// characters without spaces and without `{ } * ? [ ] \` (braces are reserved for the Redis
/// hash tag that keeps a cluster's keys in one slot; the others are glob characters).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ClusterPrefix(String);

impl ClusterPrefix {
    /// The seed's default prefix.
    pub const DEFAULT: &'static str = "websocket:cluster";

    /// Checks `prefix` and makes a cluster prefix of it.
    pub fn new(prefix: impl Into<String>) -> Result<Self, ConfigError> {
        let prefix = prefix.into();
        let reason = if prefix.is_empty() {
            "it is empty"
        } else if prefix.len() > 128 {
            "it is longer than 128 characters"
        } else if !prefix.bytes().all(|b| b.is_ascii_graphic()) {
            "only printable ASCII without spaces is allowed"
        } else if prefix.contains(['{', '}', '*', '?', '[', ']', '\\']) {
            "the characters { } * ? [ ] \\ are not allowed"
        } else {
            return Ok(Self(prefix));
        };
        Err(ConfigError::Prefix { prefix, reason })
    }

    /// The prefix as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for ClusterPrefix {
    fn default() -> Self {
        Self(Self::DEFAULT.to_owned())
    }
}

impl FromStr for ClusterPrefix {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for ClusterPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ClusterPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis(s: &str) -> RedisUrl {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn redis_forms_of_the_seed() {
        let plain = redis("localhost:6379");
        assert_eq!(
            (plain.host(), plain.port(), plain.tls()),
            ("localhost", 6379, false)
        );
        assert_eq!(plain.password(), None);
        assert_eq!(plain.to_connection_string(), "redis://localhost:6379/0");

        assert_eq!(redis("redis://localhost:6379"), plain);
        assert_eq!(redis("localhost"), plain);

        let with_password = redis("redis://s3cret@localhost:6379");
        assert_eq!(with_password.password(), Some("s3cret"));
        assert_eq!(with_password.username(), None);
        assert_eq!(
            with_password.to_connection_string(),
            "redis://:s3cret@localhost:6379/0"
        );

        let acl = redis("rediss://app:p%40ss@cache.example:6380/2");
        assert!(acl.tls());
        assert_eq!(
            (acl.username(), acl.password(), acl.port(), acl.db()),
            (Some("app"), Some("p@ss"), 6380, 2)
        );
        assert_eq!(
            acl.to_connection_string(),
            "rediss://app:p%40ss@cache.example:6380/2"
        );

        let v6 = redis("[::1]:7000");
        assert_eq!((v6.host(), v6.port()), ("::1", 7000));
        assert_eq!(v6.to_connection_string(), "redis://[::1]:7000/0");
    }

    #[test]
    fn redis_errors_name_the_problem_and_hide_the_password() {
        let cases = [
            ("", "empty"),
            ("http://localhost:6379", "unsupported scheme `http`"),
            ("redis://localhost:99999", "invalid port"),
            ("redis://localhost:6379/cache", "database number"),
            ("redis://localhost:6379/0?protocol=resp3", "query"),
            ("redis://:6379", "host"),
        ];
        for (input, expected) in cases {
            let err = input.parse::<RedisUrl>().unwrap_err().to_string();
            assert!(err.contains(expected), "{input}: {err}");
        }
        let err = "redis://user:hunter2@host:port"
            .parse::<RedisUrl>()
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        let url = redis("redis://user:hunter2@host:1");
        assert!(!url.to_string().contains("hunter2"));
        assert!(!format!("{url:?}").contains("hunter2"));
    }

    #[test]
    fn amqp_forms() {
        let url: AmqpUrl = "amqp://guest:guest@localhost:5672/".parse().unwrap();
        assert_eq!(
            (
                url.host(),
                url.port(),
                url.username(),
                url.password(),
                url.vhost()
            ),
            ("localhost", 5672, "guest", "guest", "/")
        );
        let encoded: AmqpUrl = "amqp://guest:guest@127.0.0.1:5672/%2f".parse().unwrap();
        assert_eq!(encoded.vhost(), "/");
        assert_eq!(
            encoded.to_connection_string(),
            "amqp://guest:guest@127.0.0.1:5672/%2F"
        );
        let named: AmqpUrl = "amqps://app:p%3Ass@mq.example/prod?heartbeat=10"
            .parse()
            .unwrap();
        assert!(named.tls());
        assert_eq!(
            (named.port(), named.vhost(), named.password()),
            (5671, "prod", "p:ss")
        );
        assert_eq!(
            named.to_connection_string(),
            "amqps://app:p%3Ass@mq.example:5671/prod?heartbeat=10"
        );
        assert_eq!(
            named.to_string(),
            "amqps://app:***@mq.example:5671/prod?heartbeat=10"
        );
        let defaults: AmqpUrl = "amqp://localhost".parse().unwrap();
        assert_eq!((defaults.username(), defaults.vhost()), ("guest", "/"));
    }

    #[test]
    fn amqp_errors_name_the_problem() {
        let cases = [
            ("localhost:5672", "scheme is missing"),
            ("redis://localhost", "unsupported scheme"),
            ("amqp://localhost/a/b", "one path segment"),
            ("amqp://localhost/?heartbeat=soon", "must be a number"),
            (
                "amqp://localhost/?color=blue",
                "unknown query parameter `color`",
            ),
            ("amqp://guest:topsecret@localhost:0/", "port 0"),
        ];
        for (input, expected) in cases {
            let err = input.parse::<AmqpUrl>().unwrap_err().to_string();
            assert!(err.contains(expected), "{input}: {err}");
            assert!(!err.contains("topsecret"), "{err}");
        }
    }

    #[test]
    fn prefixes() {
        assert_eq!(ClusterPrefix::default().as_str(), "websocket:cluster");
        assert!(ClusterPrefix::new("myapp:cluster").is_ok());
        for bad in ["", "has space", "a{b}", "glob*", "x".repeat(129).as_str()] {
            assert!(ClusterPrefix::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn redaction_of_unparsable_strings() {
        assert_eq!(redact("redis://u:p@h:x/0"), "redis://***@h:x/0");
        assert_eq!(redact("p@h"), "***@h");
        assert_eq!(redact("localhost"), "localhost");
    }
}
