//! Configuration from environment variables.
//!
//! Every binary reads its settings with [`envy`] into a *raw* struct of strings, then converts
//! it into a validated struct. The raw struct is declared once with [`env_config!`]: each field
//! is one variable, with its default and its meaning, so the same declaration gives envy its
//! struct, the validation its [`Setting`]s (which fall back to the declared default, so `--help`
//! cannot disagree with the behaviour) and `--help` its table ([`env_help`]). A variable cannot
//! be read without being documented.
//!
//! Every value is read as a string and parsed by a [`Setting`], so that a rejection always
//! names the variable, quotes the value and says what is accepted, e.g.
//! `LEASE_TTL="1s" is invalid: must be at least 2s (a duration like 500ms, 30s, 24h)`.
//! A binary prints such an error on one line and exits with status 2 ([`ConfigError::exit`]);
//! other start-up failures go through [`LogConfig::exit_failure`] (status 1).

use std::{
    fmt::{Debug, Display},
    ops::RangeInclusive,
    path::PathBuf,
    process::ExitCode,
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A configuration problem, always naming the environment variable at fault.
#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    /// A required variable is not set.
    #[error("{0} is required but not set")]
    Missing(String),
    /// A variable is set but its value cannot be used.
    #[error("{var}={value:?} is invalid: {reason}")]
    Invalid {
        /// The variable's name, e.g. `LEASE_TTL`.
        var: String,
        /// The value as found in the environment.
        value: String,
        /// Why it was rejected: what is accepted.
        reason: String,
    },
    /// envy rejected a variable (its message names the variable).
    #[error("invalid environment: {0}")]
    Env(String),
}

/// Exit status of a configuration error: clap's status for usage errors.
pub const EXIT_CONFIG: u8 = 2;

impl ConfigError {
    /// Builds an [`ConfigError::Invalid`].
    pub fn invalid(var: &str, value: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            var: var.to_string(),
            value: value.into(),
            reason: reason.into(),
        }
    }

    /// Prints the error on one line of stderr (`error: ...`) and exits with status 2. For the
    /// start of a binary, before anything runs. Plain text whatever `LOG_FORMAT` says, since
    /// the log format may be what is wrong.
    pub fn exit(&self) -> ! {
        eprintln!("error: {}", one_line(&self.to_string()));
        std::process::exit(i32::from(EXIT_CONFIG))
    }
}

impl From<envy::Error> for ConfigError {
    fn from(err: envy::Error) -> Self {
        match err {
            envy::Error::MissingValue(field) => ConfigError::Missing(field.to_uppercase()),
            envy::Error::Custom(msg) => ConfigError::Env(msg),
        }
    }
}

/// Joins the lines of `text` with spaces, so that an error is one line of output.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// [`crate::observe::error_chain`], with the lines of each message joined too.
fn chain_line(err: &(dyn std::error::Error + 'static)) -> String {
    one_line(&crate::observe::error_chain(err))
}

/// The environment variables a raw config struct reads: its field names (flattened parts
/// included) upper-cased. Derived from the struct itself by serde, so a deploy file can be
/// checked against what the binary really accepts (and the documented variables against it).
pub fn var_names<T: Serialize + Default>() -> Vec<String> {
    let mut names: Vec<String> = match serde_json::to_value(T::default()) {
        Ok(serde_json::Value::Object(map)) => map.keys().map(|k| k.to_uppercase()).collect(),
        _ => Vec::new(),
    };
    names.sort();
    names
}

/// The process environment as UTF-8 pairs: a variable whose name is not UTF-8 cannot be one of
/// ours and is skipped; a value that is not UTF-8 is converted lossily (and then rejected by the
/// variable's parser, by name, instead of a panic in `std::env::vars`).
pub fn process_vars() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.to_string_lossy().into_owned())))
        .collect()
}

/// Deserializes `T` from the process environment with envy.
pub fn from_env<T: for<'de> Deserialize<'de>>() -> Result<T, ConfigError> {
    from_iter(process_vars())
}

/// Deserializes `T` from the given variables (tests use this instead of mutating the process
/// environment, which is shared between threads).
pub fn from_iter<T, I>(vars: I) -> Result<T, ConfigError>
where
    T: for<'de> Deserialize<'de>,
    I: IntoIterator<Item = (String, String)>,
{
    // An empty variable means "unset": `FOO= cmd` is a common way to clear a setting.
    let vars = vars.into_iter().filter(|(_, v)| !v.is_empty());
    Ok(envy::from_iter(vars)?)
}

/// What a variable is when it is not set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvDefault {
    /// This value, parsed like a set one (so the documented default is the real one).
    Value(String),
    /// Worked out at start-up as described (e.g. `{hostname}-{pid}`).
    Computed(String),
    /// None: the variable must be set.
    Required,
}

impl Display for EnvDefault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EnvDefault::Value(v) if v.is_empty() => f.write_str("default: empty"),
            EnvDefault::Value(v) | EnvDefault::Computed(v) => write!(f, "default: {v}"),
            EnvDefault::Required => f.write_str("required"),
        }
    }
}

/// One documented environment variable: its name, default and meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvVar {
    /// The variable, e.g. `LEASE_TTL`.
    pub name: String,
    /// What it is when unset.
    pub default: EnvDefault,
    /// What it means and what it accepts, one paragraph.
    pub meaning: String,
}

impl EnvVar {
    /// The variable of raw-struct field `field` (envy's mapping: the name upper-cased; a raw
    /// identifier such as `r#loop` loses its `r#`), with the field's doc lines as its meaning.
    pub fn new(field: &str, default: EnvDefault, doc: &[&str]) -> Self {
        let meaning = doc
            .iter()
            .map(|l| l.trim())
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>();
        EnvVar {
            name: var_of(field),
            default,
            meaning: meaning.join(" "),
        }
    }

    /// The line `--help` shows the variable on: `LEASE_TTL [default: 30s]`.
    pub fn heading(&self) -> String {
        format!("{} [{}]", self.name, self.default)
    }
}

fn var_of(field: &str) -> String {
    field.trim_start_matches("r#").to_uppercase()
}

/// A raw config struct declared with [`env_config!`]: it knows the variables it reads.
pub trait EnvSpec {
    /// Every variable, its own first, then those of its flattened parts.
    fn vars() -> Vec<EnvVar>;
}

/// The environment-variable section of a binary's `--help`, generated from its raw config.
pub fn env_help<T: EnvSpec>() -> String {
    let mut out = String::from(
        "Environment variables (an empty value counts as unset; durations look like 500ms, 30s, 24h):\n",
    );
    for var in T::vars() {
        out.push_str(&format!("  {}\n", var.heading()));
        for line in wrap(&var.meaning, 90) {
            out.push_str(&format!("          {line}\n"));
        }
    }
    out.push_str(
        "\nAn invalid variable stops the binary with one line naming it and exit status 2.\n\
         RUST_BACKTRACE=1 adds the cause chain and a backtrace to other failures (status 1).",
    );
    out
}

/// Splits `text` into lines of at most `width` characters at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// Declares a raw config struct: one field per environment variable, each with its meaning
/// (the doc comment) and default, plus flattened parts shared between binaries. Generates the
/// envy struct (every field an `Option<String>`), one [`Setting`] accessor per field (same
/// name as the field) and the [`EnvSpec`] that `--help` prints. The calling crate needs
/// `serde` (the struct derives its traits).
///
/// ```
/// telemetry_shared::env_config! {
///     /// The variables of a tool.
///     pub struct RawTool {
///         flatten common: telemetry_shared::config::RawCommonConfig;
///         /// How many things to do at once.
///         workers = Value("1");
///         /// The file to read.
///         input = Required;
///         /// Names this tool in etcd.
///         tool_id = Computed("{hostname}");
///     }
/// }
/// let raw: RawTool = telemetry_shared::config::from_iter([("WORKERS".to_string(), "3".to_string())])
///     .expect("valid");
/// assert_eq!(raw.workers().number(1..=8u32), Ok(3));
/// ```
#[macro_export]
macro_rules! env_config {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $( flatten $flat:ident : $flat_ty:ty; )*
            $(
                $(#[doc = $doc:literal])+
                $field:ident = $kind:ident $(($default:expr))?;
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
        $vis struct $name {
            $(
                #[doc = concat!("Variables of [`", stringify!($flat_ty), "`].")]
                #[serde(flatten)]
                $vis $flat: $flat_ty,
            )*
            $(
                $(#[doc = $doc])+
                $vis $field: Option<String>,
            )*
        }

        #[allow(dead_code)]
        impl $name {
            $(
                $(#[doc = $doc])+
                $vis fn $field(&self) -> $crate::config::Setting<'_> {
                    $crate::config::Setting::new(
                        stringify!($field),
                        self.$field.as_deref(),
                        $crate::config::EnvDefault::$kind $(($default.into()))?,
                    )
                }
            )*
        }

        impl $crate::config::EnvSpec for $name {
            fn vars() -> Vec<$crate::config::EnvVar> {
                #[allow(unused_mut)] // a struct without flattened parts
                let mut vars: Vec<$crate::config::EnvVar> = vec![$(
                    $crate::config::EnvVar::new(
                        stringify!($field),
                        $crate::config::EnvDefault::$kind $(($default.into()))?,
                        &[$($doc),+],
                    )
                ),*];
                $( vars.extend(<$flat_ty as $crate::config::EnvSpec>::vars()); )*
                vars
            }
        }
    };
}

/// One variable's value as read (or its declared default), with parsers whose errors name the
/// variable, quote the value and say what is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting<'a> {
    name: String,
    value: Option<&'a str>,
    default: EnvDefault,
}

/// Durations longer than this are refused (etcd's own maximum lease TTL is about 285 years;
/// ten years keeps every sum of durations and every timer far from overflow).
pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

const DURATION_FORMS: &str = "a duration like 500ms, 30s, 24h";

impl<'a> Setting<'a> {
    /// The setting of raw-struct field `field` (see [`EnvVar::new`] for the name).
    pub fn new(field: &str, value: Option<&'a str>, default: EnvDefault) -> Self {
        Setting {
            name: var_of(field),
            value,
            default,
        }
    }

    /// The variable's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The value as set (`None` when unset or empty).
    pub fn value(&self) -> Option<&'a str> {
        self.value
    }

    /// The value as set, else the declared default; [`ConfigError::Missing`] when neither.
    pub fn text(&self) -> Result<&str, ConfigError> {
        match (self.value, &self.default) {
            (Some(value), _) => Ok(value),
            (None, EnvDefault::Value(default)) => Ok(default),
            (None, _) => Err(ConfigError::Missing(self.name.clone())),
        }
    }

    /// An [`ConfigError::Invalid`] for this variable's value; `reason` says what is accepted.
    pub fn invalid(&self, reason: impl Into<String>) -> ConfigError {
        let value = self.text().unwrap_or_default();
        ConfigError::invalid(&self.name, value, reason)
    }

    /// Parses the (trimmed) text with `parse`; `None` is reported as "must be {accepted}".
    pub fn parse_with<T>(
        &self,
        accepted: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<T, ConfigError> {
        let text = self.text()?;
        parse(text.trim()).ok_or_else(|| self.invalid(format!("must be {accepted}")))
    }

    /// A whole number within `range`.
    pub fn number<T>(&self, range: RangeInclusive<T>) -> Result<T, ConfigError>
    where
        T: FromStr + PartialOrd + Display,
    {
        let accepted = format!("a whole number from {} to {}", range.start(), range.end());
        self.parse_with(&accepted, |t| t.parse().ok().filter(|n| range.contains(n)))
    }

    /// `true` or `false`.
    pub fn boolean(&self) -> Result<bool, ConfigError> {
        self.parse_with("true or false", |t| match t.to_ascii_lowercase().as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        })
    }

    /// A size in bytes: a whole number, optionally with a unit `KiB`, `MiB` or `GiB` (`256MiB`).
    pub fn bytes(&self) -> Result<usize, ConfigError> {
        self.parse_with("a size like 1048576, 512KiB, 256MiB or 2GiB", parse_size)
    }

    /// Text that is not blank (trimmed).
    pub fn non_blank(&self, what: &str) -> Result<String, ConfigError> {
        self.parse_with(&format!("{what} (not blank)"), |t| {
            (!t.is_empty()).then(|| t.to_string())
        })
    }

    /// A human duration (`500ms`, `30s`, `24h`) of at least `min` and at most [`MAX_TTL`].
    pub fn duration(&self, min: Duration) -> Result<Duration, ConfigError> {
        let min_text = humantime::format_duration(min);
        let value = self.parse_with(&format!("{DURATION_FORMS}, at least {min_text}"), |t| {
            humantime::parse_duration(t).ok()
        })?;
        if value < min {
            return Err(self.invalid(format!("must be at least {min_text} ({DURATION_FORMS})")));
        }
        if value > MAX_TTL {
            return Err(self.invalid(format!("must be at most 3650 days ({DURATION_FORMS})")));
        }
        Ok(value)
    }
}

/// The settings every service shares: where etcd is, which key prefix to use, and how to
/// prove who we are to it.
#[derive(Debug, Clone, PartialEq)]
pub struct CommonConfig {
    /// etcd client endpoints (`ETCD_ENDPOINTS`, comma-separated `host:port`).
    pub etcd_endpoints: Vec<String>,
    /// Prefix put before every key (`ETCD_NAMESPACE`), so several pipelines can share one etcd.
    pub etcd_namespace: String,
    /// TLS towards etcd (`ETCD_CA_FILE`, `ETCD_CERT_FILE`, `ETCD_KEY_FILE`), when configured.
    pub etcd_tls: Option<EtcdTls>,
    /// The etcd user to authenticate as (`ETCD_USERNAME`, `ETCD_PASSWORD_FILE`), when configured.
    pub etcd_user: Option<EtcdUser>,
}

/// TLS towards etcd: the files are named here and read when the binary connects
/// ([`crate::credentials`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// `ETCD_CA_FILE`: PEM certificate(s) of the CA that signed etcd's server certificate.
    pub ca_file: PathBuf,
    /// `ETCD_CERT_FILE` and `ETCD_KEY_FILE`: the client certificate, for etcd's
    /// `--client-cert-auth`.
    pub client: Option<ClientCertFiles>,
}

/// A client certificate and its private key, both PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertFiles {
    /// `ETCD_CERT_FILE`.
    pub cert_file: PathBuf,
    /// `ETCD_KEY_FILE`.
    pub key_file: PathBuf,
}

/// An etcd user: the name, and the file its password is read from (never the environment, where
/// it would show in `/proc/*/environ`, `docker inspect` and crash reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdUser {
    /// `ETCD_USERNAME`.
    pub name: String,
    /// `ETCD_PASSWORD_FILE`: its first line is the password.
    pub password_file: PathBuf,
}

/// Default etcd endpoint when `ETCD_ENDPOINTS` is unset.
pub const DEFAULT_ETCD_ENDPOINT: &str = "127.0.0.1:2379";

env_config! {
    /// The raw form of [`CommonConfig`] as envy reads it. Services flatten it into their own raw
    /// struct.
    pub struct RawCommonConfig {
        /// etcd client endpoints: comma-separated host:port (an http:// or, with ETCD_CA_FILE,
        /// https:// prefix is accepted; without a prefix ETCD_CA_FILE selects https).
        etcd_endpoints = Value(DEFAULT_ETCD_ENDPOINT);
        /// Prefix put before every key (no white space), so several pipelines can share one etcd.
        etcd_namespace = Value("");
        /// PEM file of the CA that signed etcd's server certificate: set, the connection to etcd
        /// uses TLS.
        etcd_ca_file = Value("");
        /// PEM client certificate presented to etcd (for its --client-cert-auth); needs
        /// ETCD_KEY_FILE and ETCD_CA_FILE.
        etcd_cert_file = Value("");
        /// PEM private key of ETCD_CERT_FILE.
        etcd_key_file = Value("");
        /// etcd user to authenticate as, with the password in ETCD_PASSWORD_FILE (unset: no
        /// password authentication).
        etcd_username = Value("");
        /// File whose first line is the password of ETCD_USERNAME (the password is never read
        /// from the environment).
        etcd_password_file = Value("");
    }
}

impl TryFrom<&RawCommonConfig> for CommonConfig {
    type Error = ConfigError;

    fn try_from(raw: &RawCommonConfig) -> Result<Self, ConfigError> {
        let etcd_endpoints = parse_endpoints(raw.etcd_endpoints().text()?)?;
        let namespace = raw.etcd_namespace();
        let etcd_namespace = namespace.text()?;
        if etcd_namespace.contains(char::is_whitespace) {
            return Err(namespace.invalid("must be a key prefix without white space, like /prod"));
        }
        let etcd_tls = etcd_tls(raw)?;
        check_schemes(raw, &etcd_endpoints, etcd_tls.is_some())?;
        Ok(CommonConfig {
            etcd_endpoints,
            etcd_namespace: etcd_namespace.trim_end_matches('/').to_string(),
            etcd_tls,
            etcd_user: etcd_user(raw)?,
        })
    }
}

/// A file path variable: unset is `None`; set, it must not be blank.
fn path_setting(setting: &Setting<'_>) -> Result<Option<PathBuf>, ConfigError> {
    match setting.value() {
        None => Ok(None),
        Some(_) => Ok(Some(PathBuf::from(setting.non_blank("a file path")?))),
    }
}

fn etcd_tls(raw: &RawCommonConfig) -> Result<Option<EtcdTls>, ConfigError> {
    let (ca, cert, key) = (raw.etcd_ca_file(), raw.etcd_cert_file(), raw.etcd_key_file());
    let (ca_file, cert_file, key_file) = (path_setting(&ca)?, path_setting(&cert)?, path_setting(&key)?);
    let client = match (cert_file, key_file) {
        (Some(cert_file), Some(key_file)) => Some(ClientCertFiles { cert_file, key_file }),
        (Some(_), None) => {
            return Err(cert.invalid("must come with ETCD_KEY_FILE (the certificate's private key)"));
        }
        (None, Some(_)) => {
            return Err(key.invalid("must come with ETCD_CERT_FILE (the certificate it is the key of)"));
        }
        (None, None) => None,
    };
    match (ca_file, client) {
        (Some(ca_file), client) => Ok(Some(EtcdTls { ca_file, client })),
        (None, Some(_)) => Err(cert.invalid(
            "must come with ETCD_CA_FILE (the CA that signed etcd's certificate): a client \
             certificate is only sent over TLS",
        )),
        (None, None) => Ok(None),
    }
}

/// `https://` endpoints need a CA to check etcd's certificate against, and with TLS configured
/// an `http://` endpoint would silently not use it.
fn check_schemes(raw: &RawCommonConfig, endpoints: &[String], tls: bool) -> Result<(), ConfigError> {
    let setting = raw.etcd_endpoints();
    if !tls && endpoints.iter().any(|e| e.starts_with("https://")) {
        return Err(setting.invalid(
            "must use http:// or no scheme unless ETCD_CA_FILE is set: https:// endpoints need \
             the CA that signed etcd's certificate",
        ));
    }
    if tls && endpoints.iter().any(|e| e.starts_with("http://")) {
        return Err(
            setting.invalid("must use https:// or no scheme when ETCD_CA_FILE is set (TLS), not http://")
        );
    }
    Ok(())
}

fn etcd_user(raw: &RawCommonConfig) -> Result<Option<EtcdUser>, ConfigError> {
    let (name, password) = (raw.etcd_username(), raw.etcd_password_file());
    let password_file = path_setting(&password)?;
    match (name.value(), password_file) {
        (Some(_), Some(password_file)) => Ok(Some(EtcdUser {
            name: name.parse_with("an etcd user name (not blank, no white space)", |t| {
                (!t.is_empty() && !t.contains(char::is_whitespace)).then(|| t.to_string())
            })?,
            password_file,
        })),
        (Some(_), None) => Err(name.invalid(
            "must come with ETCD_PASSWORD_FILE (the file holding the user's password; it is \
             never read from the environment)",
        )),
        (None, Some(_)) => Err(password.invalid("must come with ETCD_USERNAME (whose password it holds)")),
        (None, None) => Ok(None),
    }
}

/// One invalid value for each variable of [`RawCommonConfig`], set alone: every service's
/// configuration test includes these so that each variable has a tested rejection.
pub const COMMON_REJECTIONS: &[(&str, &str)] = &[
    ("ETCD_ENDPOINTS", "nohost"),
    ("ETCD_ENDPOINTS", "https://127.0.0.1:2379"),
    ("ETCD_NAMESPACE", "a b"),
    ("ETCD_CA_FILE", " "),
    ("ETCD_CERT_FILE", "client.pem"),
    ("ETCD_KEY_FILE", "client-key.pem"),
    ("ETCD_USERNAME", "collector"),
    ("ETCD_PASSWORD_FILE", "password"),
];

impl TryFrom<RawCommonConfig> for CommonConfig {
    type Error = ConfigError;

    fn try_from(raw: RawCommonConfig) -> Result<Self, ConfigError> {
        CommonConfig::try_from(&raw)
    }
}

/// A size in bytes with an optional binary unit (`KiB`, `MiB`, `GiB`).
fn parse_size(text: &str) -> Option<usize> {
    let units = [
        ("GiB", 1usize << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("B", 1),
    ];
    let (number, unit) = units
        .iter()
        .find_map(|(suffix, unit)| text.strip_suffix(suffix).map(|n| (n.trim(), *unit)))
        .unwrap_or((text, 1));
    number.parse::<usize>().ok()?.checked_mul(unit)
}

/// Parses `ETCD_ENDPOINTS`: comma-separated `host:port`, optionally with an `http://` scheme.
pub fn parse_endpoints(list: &str) -> Result<Vec<String>, ConfigError> {
    let invalid = |what: String| {
        ConfigError::invalid(
            "ETCD_ENDPOINTS",
            list,
            format!("must be comma-separated host:port like 10.0.0.1:2379; {what}"),
        )
    };
    let mut out = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let host_port = item
            .strip_prefix("http://")
            .or_else(|| item.strip_prefix("https://"))
            .unwrap_or(item);
        let valid = host_port
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
        if !valid {
            return Err(invalid(format!("{item:?} is not")));
        }
        out.push(item.to_string());
    }
    if out.is_empty() {
        return Err(invalid("none is given".into()));
    }
    Ok(out)
}

/// Which message fields identify a GPU and describe it. The collector keys records by them and
/// the gateway filters by them, so both read them from the same variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    /// `HOSTNAME_COLUMN` (default `Hostname`).
    pub hostname: String,
    /// `GPU_ID_COLUMN` (default `gpu_id`).
    pub gpu_id: String,
    /// `UUID_COLUMN` (default `uuid`).
    pub uuid: String,
    /// `DEVICE_COLUMN` (default `device`; optional in messages).
    pub device: String,
    /// `MODEL_COLUMN` (default `modelName`; optional in messages).
    pub model: String,
    /// `METRIC_COLUMN` (default `metric_name`): the metric a record measures (gateway filters).
    pub metric: String,
    /// `VALUE_COLUMN` (default `value`): the measured value (the dashboard plots it).
    pub value: String,
}

impl Default for Columns {
    /// The declared defaults of [`RawColumns`] (a test checks they agree).
    fn default() -> Self {
        Columns {
            hostname: "Hostname".into(),
            gpu_id: "gpu_id".into(),
            uuid: "uuid".into(),
            device: "device".into(),
            model: "modelName".into(),
            metric: "metric_name".into(),
            value: "value".into(),
        }
    }
}

env_config! {
    /// The raw form of [`Columns`]; services flatten it into their raw config.
    pub struct RawColumns {
        /// Message field naming the GPU's host (identifies the GPU).
        hostname_column = Value("Hostname");
        /// Message field holding the GPU's index on its host (identifies the GPU).
        gpu_id_column = Value("gpu_id");
        /// Message field holding the GPU's UUID (identifies the GPU; the uuid filter matches it).
        uuid_column = Value("uuid");
        /// Message field naming the device (optional in messages; copied into the GPU index).
        device_column = Value("device");
        /// Message field naming the GPU model (optional in messages; copied into the GPU index).
        model_column = Value("modelName");
        /// Message field naming the metric a record measures (the metric filter matches it).
        metric_column = Value("metric_name");
        /// Message field holding the measured value.
        value_column = Value("value");
    }
}

impl TryFrom<&RawColumns> for Columns {
    type Error = ConfigError;

    fn try_from(raw: &RawColumns) -> Result<Self, ConfigError> {
        let field = "a message field name";
        Ok(Columns {
            hostname: raw.hostname_column().non_blank(field)?,
            gpu_id: raw.gpu_id_column().non_blank(field)?,
            uuid: raw.uuid_column().non_blank(field)?,
            device: raw.device_column().non_blank(field)?,
            model: raw.model_column().non_blank(field)?,
            metric: raw.metric_column().non_blank(field)?,
            value: raw.value_column().non_blank(field)?,
        })
    }
}

impl TryFrom<RawColumns> for Columns {
    type Error = ConfigError;

    fn try_from(raw: RawColumns) -> Result<Self, ConfigError> {
        Columns::try_from(&raw)
    }
}

/// How log lines are written (`LOG_FORMAT`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging settings, which every binary reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// `RUST_LOG` (default `info`): a `tracing` filter, checked to parse.
    pub filter: String,
    /// `LOG_FORMAT` (default `text`).
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            filter: "info".into(),
            format: LogFormat::Text,
        }
    }
}

env_config! {
    /// The raw form of [`LogConfig`]; every binary flattens it into its raw config.
    pub struct RawLogConfig {
        /// Which log lines to write on stderr: a tracing filter such as warn or
        /// info,telemetry_collector=debug.
        rust_log = Value("info");
        /// text (human-readable lines) or json (one JSON object per line).
        log_format = Value("text");
    }
}

impl TryFrom<&RawLogConfig> for LogConfig {
    type Error = ConfigError;

    fn try_from(raw: &RawLogConfig) -> Result<Self, ConfigError> {
        let filter = raw.rust_log().parse_with(
            "a tracing filter like info, warn or info,telemetry_collector=debug",
            |t| {
                tracing_subscriber::EnvFilter::builder()
                    .parse(t)
                    .ok()
                    .map(|_| t.to_string())
            },
        )?;
        let format =
            raw.log_format()
                .parse_with("text or json", |t| match t.to_ascii_lowercase().as_str() {
                    "text" => Some(LogFormat::Text),
                    "json" => Some(LogFormat::Json),
                    _ => None,
                })?;
        Ok(LogConfig { filter, format })
    }
}

impl LogConfig {
    /// Reads `RUST_LOG` and `LOG_FORMAT` from the process environment (for binaries that read
    /// nothing else).
    pub fn load() -> Result<Self, ConfigError> {
        LogConfig::try_from(&from_env::<RawLogConfig>()?)
    }

    /// Reports a failure that ends the process (cannot bind, etcd not reached before shutdown)
    /// on one line of stderr, in the log format, and returns exit status 1: the error and its
    /// causes joined by `: ` (a cause whose text is already there is left out). Written directly,
    /// not through the `RUST_LOG` filter, so it is never filtered out. With `RUST_BACKTRACE` set,
    /// the error's `Debug` form (cause chain, backtrace) follows.
    pub fn exit_failure<E>(&self, err: &E) -> ExitCode
    where
        E: AsRef<dyn std::error::Error + Send + Sync + 'static> + Debug,
    {
        let message = chain_line(err.as_ref());
        let debug = std::env::var_os("RUST_BACKTRACE")
            .is_some_and(|v| !v.is_empty() && v != "0")
            .then(|| format!("{err:?}"));
        match self.format {
            LogFormat::Text => {
                eprintln!("error: {message}");
                if let Some(debug) = debug {
                    eprintln!("{debug}");
                }
            }
            LogFormat::Json => {
                let mut line = serde_json::json!({
                    "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                    "level": "ERROR",
                    "message": message,
                });
                if let Some(debug) = debug {
                    line["debug"] = debug.into();
                }
                eprintln!("{line}");
            }
        }
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn common(pairs: &[(&str, &str)]) -> Result<CommonConfig, ConfigError> {
        CommonConfig::try_from(from_iter::<RawCommonConfig, _>(vars(pairs))?)
    }

    fn log(pairs: &[(&str, &str)]) -> Result<LogConfig, ConfigError> {
        LogConfig::try_from(&from_iter::<RawLogConfig, _>(vars(pairs))?)
    }

    env_config! {
        /// A struct with every kind of field.
        struct RawTest {
            flatten common: RawCommonConfig;
            /// The count.
            /// Second line.
            count = Value("3");
            /// The input.
            input = Required;
            /// The id.
            r#id = Computed("{pid}");
            /// The wait.
            wait = Value("30s");
            /// The flag.
            r#loop = Value("true");
        }
    }

    #[test]
    fn common_defaults() {
        let cfg = common(&[]).expect("defaults are valid");
        assert_eq!(cfg.etcd_endpoints, vec!["127.0.0.1:2379"]);
        assert_eq!(cfg.etcd_namespace, "");
        assert_eq!(
            common(&[("ETCD_NAMESPACE", "/p/")])
                .expect("valid")
                .etcd_namespace,
            "/p"
        );
    }

    #[test]
    fn endpoints_are_validated_by_name() {
        let err = common(&[("ETCD_ENDPOINTS", "a:1, nope")]).expect_err("bad endpoint");
        assert_eq!(
            err.to_string(),
            "ETCD_ENDPOINTS=\"a:1, nope\" is invalid: must be comma-separated host:port like \
             10.0.0.1:2379; \"nope\" is not"
        );
        assert!(common(&[("ETCD_ENDPOINTS", ",")]).is_err());
        assert_eq!(
            parse_endpoints("http://127.0.0.1:2379,10.0.0.1:2380").expect("valid"),
            vec!["http://127.0.0.1:2379", "10.0.0.1:2380"]
        );
    }

    #[test]
    fn tls_and_user_settings_go_together() {
        let cfg = common(&[]).expect("defaults");
        assert_eq!((cfg.etcd_tls, cfg.etcd_user), (None, None));
        let cfg = common(&[
            ("ETCD_ENDPOINTS", "https://a:1,b:2"),
            ("ETCD_CA_FILE", "/s/ca.pem"),
            ("ETCD_CERT_FILE", "/s/c.pem"),
            ("ETCD_KEY_FILE", "/s/c.key"),
            ("ETCD_USERNAME", "gateway"),
            ("ETCD_PASSWORD_FILE", "/s/password"),
        ])
        .expect("valid");
        assert_eq!(
            cfg.etcd_tls,
            Some(EtcdTls {
                ca_file: "/s/ca.pem".into(),
                client: Some(ClientCertFiles {
                    cert_file: "/s/c.pem".into(),
                    key_file: "/s/c.key".into(),
                }),
            })
        );
        assert_eq!(
            cfg.etcd_user,
            Some(EtcdUser {
                name: "gateway".into(),
                password_file: "/s/password".into(),
            })
        );
        // TLS without a client certificate (etcd without --client-cert-auth).
        let cfg = common(&[("ETCD_CA_FILE", "ca.pem")]).expect("valid");
        assert!(cfg.etcd_tls.is_some_and(|t| t.client.is_none()));

        let message = |pairs: &[(&str, &str)]| common(pairs).expect_err("invalid").to_string();
        assert_eq!(
            message(&[("ETCD_CA_FILE", "ca.pem"), ("ETCD_CERT_FILE", "c.pem")]),
            "ETCD_CERT_FILE=\"c.pem\" is invalid: must come with ETCD_KEY_FILE (the certificate's \
             private key)"
        );
        assert!(
            message(&[("ETCD_CERT_FILE", "c.pem"), ("ETCD_KEY_FILE", "c.key")])
                .starts_with("ETCD_CERT_FILE=\"c.pem\" is invalid: must come with ETCD_CA_FILE")
        );
        assert!(message(&[("ETCD_KEY_FILE", "k")]).starts_with("ETCD_KEY_FILE=\"k\" is invalid"));
        assert!(
            message(&[("ETCD_ENDPOINTS", "https://a:1")])
                .starts_with("ETCD_ENDPOINTS=\"https://a:1\" is invalid: must use http:// or no scheme")
        );
        assert!(
            message(&[("ETCD_ENDPOINTS", "http://a:1"), ("ETCD_CA_FILE", "ca.pem")])
                .starts_with("ETCD_ENDPOINTS=\"http://a:1\" is invalid: must use https://")
        );
        assert!(
            message(&[("ETCD_USERNAME", "gateway")])
                .starts_with("ETCD_USERNAME=\"gateway\" is invalid: must come with ETCD_PASSWORD_FILE")
        );
        assert!(
            message(&[("ETCD_USERNAME", "a b"), ("ETCD_PASSWORD_FILE", "p")])
                .starts_with("ETCD_USERNAME=\"a b\" is invalid: must be an etcd user name")
        );
        assert!(
            message(&[("ETCD_PASSWORD_FILE", "p")])
                .starts_with("ETCD_PASSWORD_FILE=\"p\" is invalid: must come with ETCD_USERNAME")
        );
        for (var, value) in COMMON_REJECTIONS {
            let err = common(&[(var, value)]).expect_err(var).to_string();
            assert!(
                err.starts_with(&format!("{var}={value:?} is invalid: must ")),
                "{err}"
            );
        }
        for var in var_names::<RawCommonConfig>() {
            assert!(
                COMMON_REJECTIONS.iter().any(|(v, _)| *v == var),
                "no rejection of {var}"
            );
        }
    }

    #[test]
    fn settings_fall_back_to_the_declared_default() {
        let raw: RawTest = from_iter(vars(&[("INPUT", "x"), ("COUNT", "")])).expect("raw");
        assert_eq!(raw.count().number(1..=5u32), Ok(3));
        assert_eq!(raw.input().text(), Ok("x"));
        assert_eq!(raw.id().value(), None);
        assert_eq!(raw.id().text(), Err(ConfigError::Missing("ID".into())));
        assert_eq!(
            raw.wait().duration(Duration::from_secs(2)),
            Ok(Duration::from_secs(30))
        );
        assert_eq!(raw.r#loop().boolean(), Ok(true));
        let raw: RawTest = from_iter(vars(&[])).expect("raw");
        assert_eq!(raw.input().text(), Err(ConfigError::Missing("INPUT".into())));
        assert_eq!(
            ConfigError::Missing("INPUT".into()).to_string(),
            "INPUT is required but not set"
        );
    }

    #[test]
    fn rejections_quote_the_value_and_say_what_is_accepted() {
        let raw: RawTest = from_iter(vars(&[
            ("COUNT", "9"),
            ("WAIT", "1s"),
            ("LOOP", "yes"),
            ("INPUT", " "),
        ]))
        .expect("raw");
        let message = |r: Result<String, ConfigError>| r.expect_err("invalid").to_string();
        assert_eq!(
            message(raw.count().number(1..=5u32).map(|n| n.to_string())),
            "COUNT=\"9\" is invalid: must be a whole number from 1 to 5"
        );
        assert_eq!(
            message(
                raw.wait()
                    .duration(Duration::from_secs(2))
                    .map(|d| format!("{d:?}"))
            ),
            "WAIT=\"1s\" is invalid: must be at least 2s (a duration like 500ms, 30s, 24h)"
        );
        assert_eq!(
            message(raw.r#loop().boolean().map(|b| b.to_string())),
            "LOOP=\"yes\" is invalid: must be true or false"
        );
        assert_eq!(
            message(raw.input().non_blank("a file")),
            "INPUT=\" \" is invalid: must be a file (not blank)"
        );
        let raw: RawTest = from_iter(vars(&[("WAIT", "soon")])).expect("raw");
        assert_eq!(
            message(
                raw.wait()
                    .duration(Duration::from_secs(2))
                    .map(|d| format!("{d:?}"))
            ),
            "WAIT=\"soon\" is invalid: must be a duration like 500ms, 30s, 24h, at least 2s"
        );
        let raw: RawTest = from_iter(vars(&[("WAIT", "20y")])).expect("raw");
        assert!(raw.wait().duration(Duration::ZERO).is_err());
    }

    #[test]
    fn the_spec_documents_every_field() {
        let spec = RawTest::vars();
        let names: Vec<&str> = spec.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "COUNT",
                "INPUT",
                "ID",
                "WAIT",
                "LOOP",
                "ETCD_ENDPOINTS",
                "ETCD_NAMESPACE",
                "ETCD_CA_FILE",
                "ETCD_CERT_FILE",
                "ETCD_KEY_FILE",
                "ETCD_USERNAME",
                "ETCD_PASSWORD_FILE"
            ]
        );
        assert_eq!(spec[0].meaning, "The count. Second line.");
        assert_eq!(spec[0].heading(), "COUNT [default: 3]");
        assert_eq!(spec[1].heading(), "INPUT [required]");
        assert_eq!(spec[2].heading(), "ID [default: {pid}]");
        assert_eq!(spec[6].heading(), "ETCD_NAMESPACE [default: empty]");
        let mut sorted = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        sorted.sort();
        assert_eq!(var_names::<RawTest>(), sorted);
        let help = env_help::<RawTest>();
        assert!(
            help.contains("  COUNT [default: 3]\n          The count. Second line.\n"),
            "{help}"
        );
    }

    #[test]
    fn shared_parts_document_what_they_read() {
        for (spec, names) in [
            (RawCommonConfig::vars(), var_names::<RawCommonConfig>()),
            (RawColumns::vars(), var_names::<RawColumns>()),
            (RawLogConfig::vars(), var_names::<RawLogConfig>()),
        ] {
            let mut documented: Vec<String> = spec.into_iter().map(|v| v.name).collect();
            documented.sort();
            assert_eq!(documented, names);
        }
        assert_eq!(
            var_names::<RawCommonConfig>(),
            vec![
                "ETCD_CA_FILE",
                "ETCD_CERT_FILE",
                "ETCD_ENDPOINTS",
                "ETCD_KEY_FILE",
                "ETCD_NAMESPACE",
                "ETCD_PASSWORD_FILE",
                "ETCD_USERNAME"
            ]
        );
        assert_eq!(var_names::<RawLogConfig>(), vec!["LOG_FORMAT", "RUST_LOG"]);
        let columns = Columns::try_from(from_iter::<RawColumns, _>(vars(&[])).expect("raw"));
        assert_eq!(columns, Ok(Columns::default()));
        let err =
            Columns::try_from(from_iter::<RawColumns, _>(vars(&[("METRIC_COLUMN", " ")])).expect("raw"))
                .expect_err("blank");
        assert!(err.to_string().contains("METRIC_COLUMN=\" \""), "{err}");
    }

    #[test]
    fn log_settings() {
        assert_eq!(log(&[]), Ok(LogConfig::default()));
        let json = log(&[
            ("LOG_FORMAT", "JSON"),
            ("RUST_LOG", "warn,telemetry_shared=debug"),
        ])
        .expect("valid");
        assert_eq!(json.format, LogFormat::Json);
        assert_eq!(json.filter, "warn,telemetry_shared=debug");
        assert_eq!(
            log(&[("LOG_FORMAT", "yaml")]).expect_err("invalid").to_string(),
            "LOG_FORMAT=\"yaml\" is invalid: must be text or json"
        );
        let err = log(&[("RUST_LOG", "info,x=loud")]).expect_err("invalid level");
        assert!(
            err.to_string()
                .starts_with("RUST_LOG=\"info,x=loud\" is invalid: must be"),
            "{err}"
        );
    }

    #[test]
    fn missing_value_is_upper_cased() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Needs {
            csv_path: String,
        }
        let err = from_iter::<Needs, _>(vars(&[])).expect_err("missing");
        assert_eq!(err, ConfigError::Missing("CSV_PATH".into()));
    }

    #[test]
    fn errors_are_one_line() {
        assert_eq!(one_line("a\n  b\n\nc"), "a b c");
        let err = ConfigError::invalid("X", "a\nb", "must be one line");
        assert_eq!(err.to_string(), "X=\"a\\nb\" is invalid: must be one line");
        assert_eq!(wrap("aa bb cc", 5), vec!["aa bb", "cc"]);
        #[derive(Debug, Error)]
        #[error("outer: {0}")]
        struct Outer(#[source] Inner);
        #[derive(Debug, Error)]
        #[error("inner\nfailure")]
        struct Inner;
        #[derive(Debug, Error)]
        #[error("context")]
        struct Context(#[source] Outer);
        assert_eq!(
            chain_line(&Context(Outer(Inner))),
            "context: outer: inner failure"
        );
    }
}
