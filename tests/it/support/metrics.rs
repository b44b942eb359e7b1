//! A strict reader of the two exposition formats the agent serves on
//! `/metrics`: the Prometheus text format 0.0.4 and OpenMetrics 1.0 text.
//! Strict on purpose: what it accepts, any scraper accepts.

use std::collections::BTreeMap;

/// The metric families a Prometheus user writes queries against: every
/// form of the metrics must declare them.
pub const FAMILIES: [&str; 6] = [
    "keysync_fetch_total",
    "keysync_last_success_timestamp_seconds",
    "keysync_keys",
    "keysync_writes_total",
    "keysync_drift_repairs_total",
    "keysync_fetch_duration_seconds",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4.
    Prometheus,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Default)]
pub struct Exposition {
    /// Family name -> type.
    pub families: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    pub fn family_type(&self, name: &str) -> Option<&str> {
        self.families.get(name).map(String::as_str)
    }

    /// The value of the sample with exactly these labels.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }
}

fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ if text
            .chars()
            .all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) =>
        {
            text.parse().map_err(|_| format!("bad value {text:?}"))
        }
        _ => Err(format!("bad value {text:?}")),
    }
}

/// `name{a="b",…} value [timestamp]`.
fn parse_sample(line: &str) -> Result<(Sample, Option<&str>), String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or_else(|| format!("no value: {line:?}"))?;
    let name = &line[..name_end];
    if !valid_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut s = after;
        loop {
            if let Some(after) = s.strip_prefix('}') {
                s = after;
                break;
            }
            let eq = s
                .find('=')
                .ok_or_else(|| format!("bad labels in {line:?}"))?;
            let lname = &s[..eq];
            if !valid_label_name(lname) {
                return Err(format!("bad label name {lname:?} in {line:?}"));
            }
            s = s[eq + 1..]
                .strip_prefix('"')
                .ok_or_else(|| format!("unquoted label value in {line:?}"))?;
            let mut value = String::new();
            let mut chars = s.char_indices();
            let close = loop {
                match chars.next() {
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        other => return Err(format!("bad escape {other:?} in {line:?}")),
                    },
                    Some((_, '\n')) | None => {
                        return Err(format!("unterminated label value in {line:?}"));
                    }
                    Some((_, c)) => value.push(c),
                }
            };
            if labels.insert(lname.to_string(), value).is_some() {
                return Err(format!("label {lname} twice in {line:?}"));
            }
            s = &s[close + 1..];
            if let Some(after) = s.strip_prefix(',') {
                s = after;
            } else if !s.starts_with('}') {
                return Err(format!("expected , or }} in {line:?}"));
            }
        }
        rest = s;
    }
    let rest = rest
        .strip_prefix(' ')
        .ok_or_else(|| format!("expected one space before the value: {line:?}"))?;
    let mut fields = rest.split(' ');
    let value = parse_value(fields.next().unwrap_or(""))?;
    let timestamp = fields.next();
    if fields.next().is_some() {
        return Err(format!("trailing fields in {line:?}"));
    }
    Ok((
        Sample {
            name: name.to_string(),
            labels,
            value,
        },
        timestamp,
    ))
}

/// The family a sample belongs to, given the declared families and format.
fn family_of<'a>(
    name: &'a str,
    families: &BTreeMap<String, String>,
    format: Format,
) -> Option<(&'a str, &'a str)> {
    let suffixes: &[&str] = &["", "_total", "_created", "_bucket", "_sum", "_count"];
    for suffix in suffixes {
        let Some(base) = name.strip_suffix(suffix) else {
            continue;
        };
        let Some(kind) = families.get(base) else {
            continue;
        };
        let allowed: &[&str] = match (format, kind.as_str()) {
            (Format::OpenMetrics, "counter") => &["_total", "_created"],
            (Format::Prometheus, "counter") => &[""],
            (_, "gauge") | (_, "untyped") | (_, "unknown") => &[""],
            (_, "histogram") => &["_bucket", "_sum", "_count", "_created"],
            (_, "summary") => &["", "_sum", "_count", "_created"],
            _ => &[],
        };
        if allowed.contains(suffix) {
            return Some((base, suffix));
        }
    }
    None
}

/// Parses `text` strictly: well-formed lines, metadata before samples and
/// once per family, families not interleaved, no duplicate series, every
/// sample in a declared family with a suffix its type allows, counters
/// non-negative, histograms with cumulative buckets ending at `+Inf` equal
/// to `_count`; OpenMetrics ends with `# EOF`.
pub fn parse_exposition(text: &str, format: Format) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    let mut helps = std::collections::BTreeSet::new();
    let mut done_families = std::collections::BTreeSet::new();
    let mut current: Option<String> = None;
    let mut seen_series = std::collections::BTreeSet::new();
    if !text.ends_with('\n') {
        return Err("exposition does not end with a newline".into());
    }
    let mut lines: Vec<&str> = text.lines().collect();
    if format == Format::OpenMetrics {
        if lines.pop() != Some("# EOF") {
            return Err("OpenMetrics text must end with # EOF".into());
        }
    } else if lines.contains(&"# EOF") {
        return Err("# EOF in Prometheus text".into());
    }
    let mut enter = |family: &str, current: &mut Option<String>| -> Result<(), String> {
        if current.as_deref() != Some(family) {
            if let Some(prev) = current.take() {
                done_families.insert(prev);
            }
            if done_families.contains(family) {
                return Err(format!("family {family} is interleaved with another"));
            }
            *current = Some(family.to_string());
        }
        Ok(())
    };
    for line in lines {
        if line.is_empty() {
            if format == Format::OpenMetrics {
                return Err("empty line in OpenMetrics text".into());
            }
            continue;
        }
        if let Some(meta) = line.strip_prefix('#') {
            let meta = meta.strip_prefix(' ').unwrap_or(meta);
            let mut parts = meta.splitn(3, ' ');
            let keyword = parts.next().unwrap_or("");
            let name = parts.next().unwrap_or("");
            let arg = parts.next();
            match keyword {
                "HELP" => {
                    if !valid_metric_name(name) {
                        return Err(format!("bad HELP line {line:?}"));
                    }
                    enter(name, &mut current)?;
                    if !helps.insert(name.to_string()) {
                        return Err(format!("HELP twice for {name}"));
                    }
                }
                "TYPE" => {
                    let kind = arg.ok_or_else(|| format!("TYPE without a type: {line:?}"))?;
                    let kinds: &[&str] = match format {
                        Format::Prometheus => {
                            &["counter", "gauge", "histogram", "summary", "untyped"]
                        }
                        Format::OpenMetrics => &[
                            "counter",
                            "gauge",
                            "histogram",
                            "gaugehistogram",
                            "stateset",
                            "info",
                            "summary",
                            "unknown",
                        ],
                    };
                    if !valid_metric_name(name) || !kinds.contains(&kind) {
                        return Err(format!("bad TYPE line {line:?}"));
                    }
                    if format == Format::Prometheus
                        && kind == "counter"
                        && !name.ends_with("_total")
                    {
                        // Not a format error, but every counter here is named _total.
                        return Err(format!("counter {name} not named *_total"));
                    }
                    enter(name, &mut current)?;
                    if out
                        .families
                        .insert(name.to_string(), kind.to_string())
                        .is_some()
                    {
                        return Err(format!("TYPE twice for {name}"));
                    }
                    if out.samples.iter().any(|s| {
                        family_of(&s.name, &out.families, format).is_some_and(|(f, _)| f == name)
                    }) {
                        return Err(format!("TYPE for {name} after its samples"));
                    }
                }
                "UNIT" if format == Format::OpenMetrics => {
                    enter(name, &mut current)?;
                }
                _ if format == Format::Prometheus => {} // a comment
                _ => return Err(format!("unknown metadata line {line:?}")),
            }
            continue;
        }
        let (sample, _timestamp) = parse_sample(line)?;
        let (family, suffix) = family_of(&sample.name, &out.families, format)
            .ok_or_else(|| format!("sample {} belongs to no declared family", sample.name))?;
        enter(family, &mut current)?;
        let kind = out.families[family].as_str();
        if kind == "counter"
            && (suffix == "_total" || format == Format::Prometheus)
            && (sample.value < 0.0 || sample.value.is_nan())
        {
            return Err(format!("negative counter {line:?}"));
        }
        if kind == "histogram" && suffix == "_bucket" && !sample.labels.contains_key("le") {
            return Err(format!("bucket without le: {line:?}"));
        }
        if !seen_series.insert((sample.name.clone(), sample.labels.clone())) {
            return Err(format!("duplicate series {line:?}"));
        }
        out.samples.push(sample);
    }
    check_histograms(&out)?;
    Ok(out)
}

fn check_histograms(exp: &Exposition) -> Result<(), String> {
    for (family, kind) in &exp.families {
        if kind != "histogram" {
            continue;
        }
        // Group by the labels other than le.
        let mut groups: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
        for s in exp
            .samples
            .iter()
            .filter(|s| s.name == format!("{family}_bucket"))
        {
            let mut labels = s.labels.clone();
            let le = labels.remove("le").unwrap_or_default();
            let le = parse_value(&le)?;
            groups.entry(labels).or_default().push((le, s.value));
        }
        for (labels, buckets) in groups {
            let mut prev: Option<(f64, f64)> = None;
            for &(le, count) in &buckets {
                if let Some((ple, pcount)) = prev
                    && (le <= ple || count < pcount)
                {
                    return Err(format!(
                        "{family}{labels:?}: buckets not increasing/cumulative"
                    ));
                }
                prev = Some((le, count));
            }
            let Some((last_le, last_count)) = prev else {
                continue;
            };
            if last_le != f64::INFINITY {
                return Err(format!("{family}{labels:?}: no +Inf bucket"));
            }
            let count = exp
                .samples
                .iter()
                .find(|s| s.name == format!("{family}_count") && s.labels == labels)
                .map(|s| s.value);
            if count != Some(last_count) {
                return Err(format!(
                    "{family}{labels:?}: _count {count:?} != +Inf bucket {last_count}"
                ));
            }
            if !exp
                .samples
                .iter()
                .any(|s| s.name == format!("{family}_sum") && s.labels == labels)
            {
                return Err(format!("{family}{labels:?}: no _sum"));
            }
        }
    }
    Ok(())
}
