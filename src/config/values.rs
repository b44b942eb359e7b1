//! Typed values from the config's text, each with its error: durations,
//! sizes and URLs (plain `http://` only to loopback). The `At` forms name
//! the file, line and field.

use std::time::Duration;

use super::ConfigError;
use super::fragment::{At, Spanned};

pub(super) fn invalid<T>(
    at: &At<'_>,
    span: std::ops::Range<usize>,
    field: &str,
    message: impl Into<String>,
) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid {
        path: at.path.to_path_buf(),
        line: at.line(span),
        field: field.to_string(),
        message: message.into(),
    })
}

pub(super) fn duration(
    at: &At<'_>,
    field: &str,
    value: &Spanned<String>,
) -> Result<Duration, ConfigError> {
    match parse_duration(value.get_ref()) {
        Ok(d) => Ok(d),
        Err(message) => invalid(at, value.span(), field, message),
    }
}

pub(super) fn positive(
    at: &At<'_>,
    field: &str,
    value: &Spanned<String>,
) -> Result<Duration, ConfigError> {
    let d = duration(at, field, value)?;
    if d.is_zero() {
        return invalid(at, value.span(), field, "must be greater than zero");
    }
    Ok(d)
}

/// Parses `"250ms"`, `"60s"`, `"10m"`, `"24h"`, `"1h 30m"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like \"250ms\", \"60s\" or \"10m\" ({e})"))
}

/// Parses a byte size: `"4MiB"`, `"512KiB"`, `"1048576"`, `"2MB"`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size like \"4MiB\""))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(format!("{text:?}: unknown unit (use B, KiB, MiB or GiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{text:?} is too large"))
}

pub(super) fn validate_url(
    at: &At<'_>,
    field: &str,
    value: &Spanned<String>,
) -> Result<String, ConfigError> {
    let url = value.get_ref();
    match reqwest::Url::parse(url) {
        Ok(parsed) => match parsed.scheme() {
            "https" => Ok(url.clone()),
            "http" if is_loopback_host(&parsed) => Ok(url.clone()),
            "http" => invalid(
                at,
                value.span(),
                field,
                "plain http:// is allowed only to loopback addresses; use https://",
            ),
            other => invalid(
                at,
                value.span(),
                field,
                format!("unsupported scheme {other:?}"),
            ),
        },
        Err(e) => invalid(at, value.span(), field, format!("not a URL: {e}")),
    }
}

/// True for 127.0.0.0/8, ::1 and `localhost`.
pub fn is_loopback_host(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}
