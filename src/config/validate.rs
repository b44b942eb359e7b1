//! Stage 3: the merged fragment becomes [`Settings`] with defaults filled in;
//! durations, sizes and URLs become typed values and every cross reference
//! (a user's sources) is checked. Errors name the file, line and field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::fragment::{At, Fragment, PolicyFragment, SourceFragment, Spanned, UserFragment, at_of};
use super::settings::{
    ApiKeySource, PolicySettings, Settings, SourceKind, SourceSettings, UserSettings, WriteMode,
};
use super::values::{duration, invalid, parse_size, positive, validate_url};
use super::{
    ConfigError, DEFAULT_HEALTH_SOCKET, DEFAULT_REFRESH_MIN_INTERVAL, DEFAULT_STATE_DIR,
    DEFAULT_VAST_URL,
};
use crate::keys::{DEFAULT_ALGORITHMS, options_are_closed};

pub(super) fn validate(merged: Fragment, files: &[(&Path, &str)]) -> Result<Settings, ConfigError> {
    let (metrics_textfile, metrics_listen) = validate_metrics(&merged, files)?;
    let state_dir = merged
        .state_dir
        .map(|s| s.into_inner())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let health_socket = merged
        .health_socket
        .map(|s| s.into_inner())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_HEALTH_SOCKET));
    let refresh_min_interval = match &merged.refresh_min_interval {
        Some(v) => duration(&at_of(files, &merged.origin), "refresh_min_interval", v)?,
        None => DEFAULT_REFRESH_MIN_INTERVAL,
    };

    let mut sources = BTreeMap::new();
    for (name, frag) in merged.sources {
        let at = at_of(files, &frag.origin);
        let settings = validate_source(&name, frag, &at)?;
        sources.insert(name, settings);
    }

    let policy = match merged.policy {
        Some(frag) => {
            let at = at_of(files, &frag.origin);
            validate_policy(frag, &at)?
        }
        None => PolicySettings::default(),
    };

    let mut users = Vec::new();
    for frag in merged.users {
        let at = at_of(files, &frag.origin);
        users.push(validate_user(frag, &sources, &at)?);
    }

    Ok(Settings {
        config_path: PathBuf::new(),
        files: Vec::new(),
        state_dir,
        health_socket,
        refresh_min_interval,
        sources,
        users,
        policy,
        metrics_textfile,
        metrics_listen,
    })
}

/// `metrics_textfile`: an absolute `*.prom` path (node_exporter's textfile
/// collector reads no other name); `metrics_listen`: an IP address and port.
fn validate_metrics(
    merged: &Fragment,
    files: &[(&Path, &str)],
) -> Result<(Option<PathBuf>, Option<std::net::SocketAddr>), ConfigError> {
    // Top-level values carry no origin: the last file whose text holds the
    // value at its span is where it came from.
    let at_of_top = |span: &std::ops::Range<usize>, value: &str| {
        files
            .iter()
            .rev()
            .find(|(_, text)| text.get(span.clone()).is_some_and(|t| t.contains(value)))
            .map_or(
                At {
                    path: Path::new("?"),
                    text: "",
                },
                |(path, text)| At { path, text },
            )
    };
    let textfile = match &merged.metrics_textfile {
        Some(p) => {
            let at = at_of_top(&p.span(), &p.get_ref().to_string_lossy());
            let path = p.get_ref();
            if !path.is_absolute() {
                return invalid(
                    &at,
                    p.span(),
                    "metrics_textfile",
                    "must be an absolute path",
                );
            }
            if path.extension().is_none_or(|e| e != "prom") {
                return invalid(
                    &at,
                    p.span(),
                    "metrics_textfile",
                    "must end in .prom: node_exporter's textfile collector reads only *.prom files",
                );
            }
            Some(path.clone())
        }
        None => None,
    };
    let listen = match &merged.metrics_listen {
        Some(a) => {
            let at = at_of_top(&a.span(), a.get_ref());
            match a.get_ref().trim().parse::<std::net::SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    return invalid(
                        &at,
                        a.span(),
                        "metrics_listen",
                        format!(
                            "{:?} is not an IP address and port like \"127.0.0.1:9273\" or \"[::1]:9273\"",
                            a.get_ref()
                        ),
                    );
                }
            }
        }
        None => None,
    };
    Ok((textfile, listen))
}

fn validate_source(
    name: &str,
    f: SourceFragment,
    at: &At<'_>,
) -> Result<SourceSettings, ConfigError> {
    let field = |k: &str| format!("sources.{name}.{k}");
    let kind_name = f
        .kind
        .as_ref()
        .map(|k| k.get_ref().as_str())
        .unwrap_or("vast");
    let kind_span = f.kind.as_ref().map(|k| k.span()).unwrap_or(0..0);
    let kind = match kind_name {
        "vast" => {
            let url = match &f.url {
                Some(u) => validate_url(at, &field("url"), u)?,
                None => DEFAULT_VAST_URL.to_string(),
            };
            SourceKind::Vast {
                url,
                api_key: ApiKeySource {
                    api_key_file: f.api_key_file.as_ref().map(|p| p.get_ref().clone()),
                    api_key_env: f
                        .api_key_env
                        .as_ref()
                        .map(|e| e.get_ref().clone())
                        .unwrap_or_else(|| "VAST_API_KEY".to_string()),
                },
            }
        }
        "http" => match &f.url {
            Some(u) => SourceKind::Http {
                url: validate_url(at, &field("url"), u)?,
            },
            None => return invalid(at, kind_span, &field("url"), "an http source needs a url"),
        },
        "file" => match &f.path {
            Some(p) => SourceKind::File {
                path: p.get_ref().clone(),
            },
            None => return invalid(at, kind_span, &field("path"), "a file source needs a path"),
        },
        #[cfg(test)]
        "static" => SourceKind::Static {
            keys: f.keys.clone().unwrap_or_default(),
        },
        other => {
            return invalid(
                at,
                kind_span,
                &field("kind"),
                format!("unknown kind {other:?} (expected vast, http or file)"),
            );
        }
    };
    // Fields that only make sense for some kinds.
    if !matches!(kind, SourceKind::Vast { .. }) {
        for (key, span) in [
            ("api_key_file", f.api_key_file.as_ref().map(|v| v.span())),
            ("api_key_env", f.api_key_env.as_ref().map(|v| v.span())),
        ] {
            if let Some(span) = span {
                return invalid(
                    at,
                    span,
                    &field(key),
                    format!("not used by a {kind_name} source"),
                );
            }
        }
    }
    if !matches!(kind, SourceKind::File { .. })
        && let Some(p) = &f.path
    {
        return invalid(
            at,
            p.span(),
            &field("path"),
            "only a file source has a path",
        );
    }
    if matches!(kind, SourceKind::File { .. })
        && let Some(u) = &f.url
    {
        return invalid(
            at,
            u.span(),
            &field("url"),
            "a file source has a path, not a url",
        );
    }

    let opt =
        |v: &Option<Spanned<String>>, key: &str, default: Duration, must_be_positive: bool| match v
        {
            Some(v) if must_be_positive => positive(at, &field(key), v),
            Some(v) => duration(at, &field(key), v),
            None => Ok(default),
        };
    let interval = opt(&f.interval, "interval", Duration::from_secs(60), true)?;
    let jitter = opt(&f.jitter, "jitter", Duration::from_secs(10), false)?;
    let timeout = opt(&f.timeout, "timeout", Duration::from_secs(10), true)?;
    let resync = opt(&f.resync, "resync", Duration::from_secs(600), true)?;
    let max_backoff = opt(
        &f.max_backoff,
        "max_backoff",
        Duration::from_secs(300),
        true,
    )?;
    let max_body = match &f.max_body {
        Some(v) => match parse_size(v.get_ref()) {
            Ok(0) => {
                return invalid(
                    at,
                    v.span(),
                    &field("max_body"),
                    "must be greater than zero",
                );
            }
            Ok(n) => n,
            Err(m) => return invalid(at, v.span(), &field("max_body"), m),
        },
        None => 4 << 20,
    };
    let subscribe_url = match &f.subscribe_url {
        Some(u) if matches!(kind, SourceKind::File { .. }) => {
            return invalid(
                at,
                u.span(),
                &field("subscribe_url"),
                "a file source is watched, not subscribed",
            );
        }
        Some(u) => Some(validate_url(at, &field("subscribe_url"), u)?),
        None => None,
    };
    Ok(SourceSettings {
        name: name.to_string(),
        kind,
        interval,
        jitter,
        timeout,
        max_body,
        max_backoff,
        subscribe_url,
        resync,
        ca_file: f.ca_file.map(|p| p.into_inner()),
    })
}

fn validate_policy(f: PolicyFragment, at: &At<'_>) -> Result<PolicySettings, ConfigError> {
    let mut policy = PolicySettings::default();
    if let Some(bits) = f.min_rsa_bits {
        if *bits.get_ref() < 1024 {
            return invalid(
                at,
                bits.span(),
                "policy.min_rsa_bits",
                "must be at least 1024",
            );
        }
        policy.keys.min_rsa_bits = *bits.get_ref();
    }
    if let Some(algs) = f.allowed_algorithms {
        let mut list = Vec::new();
        for alg in algs.get_ref() {
            if alg == "ssh-dss" {
                return invalid(
                    at,
                    algs.span(),
                    "policy.allowed_algorithms",
                    "ssh-dss is never allowed",
                );
            }
            if !DEFAULT_ALGORITHMS.contains(&alg.as_str()) {
                return invalid(
                    at,
                    algs.span(),
                    "policy.allowed_algorithms",
                    format!(
                        "unknown algorithm {alg:?} (known: {})",
                        DEFAULT_ALGORITHMS.join(", ")
                    ),
                );
            }
            list.push(alg.clone());
        }
        policy.keys.allowed_algorithms = list;
    }
    if let Some(allow) = f.allow_source_options {
        policy.keys.allow_source_options = allow;
    }
    if let Some(v) = &f.max_stale {
        policy.max_stale = Some(positive(at, "policy.max_stale", v)?);
    }
    if let Some(v) = &f.confirm_delay {
        policy.confirm_delay = duration(at, "policy.confirm_delay", v)?;
    }
    if let Some(v) = &f.revoked_retention {
        policy.revoked_retention = positive(at, "policy.revoked_retention", v)?;
    }
    if let Some(remove) = f.remove_revoked_copies {
        policy.remove_revoked_copies = remove;
    }
    Ok(policy)
}

fn validate_user(
    f: UserFragment,
    sources: &BTreeMap<String, SourceSettings>,
    at: &At<'_>,
) -> Result<UserSettings, ConfigError> {
    let name = f.name.get_ref().clone();
    let field = |k: &str| format!("users[{name}].{k}");
    if name.is_empty()
        || name.starts_with('-')
        || name.contains(['/', '\0'])
        || name == "."
        || name == ".."
        || name.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return invalid(
            at,
            f.name.span(),
            "users.name",
            format!("{name:?} is not a valid user name"),
        );
    }
    let (user_sources, sources_span) = match &f.sources {
        Some(s) => (s.get_ref().clone(), s.span()),
        None => {
            return invalid(
                at,
                f.name.span(),
                &field("sources"),
                "a user needs at least one source",
            );
        }
    };
    if user_sources.is_empty() {
        return invalid(
            at,
            sources_span,
            &field("sources"),
            "a user needs at least one source",
        );
    }
    for s in &user_sources {
        if !sources.contains_key(s) {
            return invalid(
                at,
                sources_span.clone(),
                &field("sources"),
                format!("names undefined source {s:?}"),
            );
        }
    }
    let write = match &f.write {
        Some(w) => match w.get_ref().as_str() {
            "block" => WriteMode::Block,
            "fragment" => WriteMode::Fragment,
            "none" => WriteMode::None,
            other => {
                return invalid(
                    at,
                    w.span(),
                    &field("write"),
                    format!("unknown mode {other:?} (expected block, fragment or none)"),
                );
            }
        },
        None => WriteMode::Block,
    };
    let path = match (&f.path, write) {
        (Some(p), WriteMode::None) => {
            return invalid(
                at,
                p.span(),
                &field("path"),
                "write = \"none\" writes no file in the home",
            );
        }
        (Some(p), _) => {
            let text = p.get_ref();
            if !(text.starts_with("~/") || text.starts_with('/')) {
                return invalid(
                    at,
                    p.span(),
                    &field("path"),
                    "must be absolute or start with ~/",
                );
            }
            if text.split('/').any(|c| c == "..") || text.ends_with('/') {
                return invalid(at, p.span(), &field("path"), "must name a file, without ..");
            }
            Some(text.clone())
        }
        (None, mode) => mode.default_path().map(str::to_string),
    };
    let options = match &f.options {
        Some(o) => {
            let text = o.get_ref().trim();
            // Prepended to every key's line: they must end where sshd
            // ends them, or sshd would read another key than the one checked.
            if text.chars().any(|c| c.is_control()) || !options_are_closed(text) {
                return invalid(
                    at,
                    o.span(),
                    &field("options"),
                    "options are one comma-separated list without control characters, \
                     spaces only inside double quotes, every quote closed",
                );
            }
            (!text.is_empty()).then(|| text.to_string())
        }
        None => None,
    };
    Ok(UserSettings {
        name,
        sources: user_sources,
        write,
        path,
        options,
    })
}
