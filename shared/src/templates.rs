//! Templates: what a notification says on each channel, in each language, rendered with
//! handlebars at send time.
//!
//! A template is a code and a locale (`order_shipped`, `fr-CA`) holding one part per place a
//! channel shows text ([`Parts`]). Rendering is strict: a variable the data lacks is an error,
//! never an empty string. The HTML part of an email is HTML-escaped; every other part is text
//! and is not. Helpers: `default`, `upper`, `lower`, `truncate`, `number` and `date`, the last
//! two in the recipient's locale and time zone. Partials and decorators are refused: a template
//! is one self-contained text, so nothing can recurse or reach another tenant's template.
//!
//! Every problem a template can have is found when it is written ([`Parts::check`]): syntax
//! errors (with line and column), unknown helpers, partials, sizes. Sending never discovers a
//! broken template, only data that lacks a variable.

use std::{collections::BTreeMap, fmt};

use chrono::{DateTime, Utc};
use handlebars::{
    Context, Handlebars, Helper, HelperResult, Output, RenderContext, RenderError, RenderErrorReason,
    Renderable, StringOutput, Template,
    template::{HelperTemplate, Parameter, TemplateElement},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest part, in bytes of source.
pub const MAX_PART_BYTES: usize = 64 * 1024;
/// Most entries in a push part's `data`.
pub const MAX_PUSH_DATA: usize = 32;
/// Longest rendered part: a template with a loop over large data can grow without bound.
pub const MAX_RENDERED_BYTES: usize = 256 * 1024;
/// The key under which rendering passes the locale and time zone to the helpers; data may not
/// use it.
const RESERVED: &str = "__herald";

/// What a template says, per channel. Every part is optional; a channel whose parts are all
/// absent is one the template does not cover.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Parts {
    pub email_subject: Option<String>,
    pub email_text: Option<String>,
    /// Escaped as HTML when rendered.
    pub email_html: Option<String>,
    /// The From mailbox (`Name <address>` or `address`) instead of `HERALD_EMAIL_FROM`; it
    /// must render to one mailbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_from: Option<String>,
    /// The Reply-To mailbox instead of `HERALD_EMAIL_REPLY_TO`; it must render to one mailbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_reply_to: Option<String>,
    pub sms_text: Option<String>,
    pub push_title: Option<String>,
    pub push_body: Option<String>,
    /// Key/value pairs sent with a push notification; each value is a template.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub push_data: BTreeMap<String, String>,
    pub webhook_title: Option<String>,
    pub webhook_body: Option<String>,
    pub inapp_title: Option<String>,
    pub inapp_body: Option<String>,
}

/// A problem with a template, found when it is written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{part}{}: {message}", position(*.line, *.column))]
pub struct TemplateProblem {
    /// Which part (`email_html`, `push_data.url`).
    pub part: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

fn position(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(" line {l} column {c}"),
        (Some(l), None) => format!(" line {l}"),
        _ => String::new(),
    }
}

/// Why rendering failed: the data does not fit the template.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{part}: {message}")]
pub struct RenderProblem {
    pub part: String,
    pub message: String,
}

/// Every part, named, in a fixed order; HTML parts are marked.
fn named(parts: &Parts) -> Vec<(String, &String, bool)> {
    let mut out = Vec::new();
    let fixed = [
        ("email_subject", &parts.email_subject, false),
        ("email_text", &parts.email_text, false),
        ("email_html", &parts.email_html, true),
        ("email_from", &parts.email_from, false),
        ("email_reply_to", &parts.email_reply_to, false),
        ("sms_text", &parts.sms_text, false),
        ("push_title", &parts.push_title, false),
        ("push_body", &parts.push_body, false),
        ("webhook_title", &parts.webhook_title, false),
        ("webhook_body", &parts.webhook_body, false),
        ("inapp_title", &parts.inapp_title, false),
        ("inapp_body", &parts.inapp_body, false),
    ];
    for (name, part, html) in fixed {
        if let Some(p) = part {
            out.push((name.to_owned(), p, html));
        }
    }
    for (key, value) in &parts.push_data {
        out.push((format!("push_data.{key}"), value, false));
    }
    out
}

/// Helpers every template may call: the built-in ones handlebars has, and Herald's.
const BUILT_IN: &[&str] = &[
    "if", "unless", "each", "with", "lookup", "eq", "ne", "gt", "gte", "lt", "lte", "and", "or", "not", "len",
];
const OURS: &[&str] = &["default", "upper", "lower", "truncate", "number", "date"];

impl Parts {
    /// Checks every part: size, syntax (with line and column), only known helpers, no partials
    /// or decorators. A template that passes can only fail to render for want of data.
    pub fn check(&self) -> Result<(), TemplateProblem> {
        let problem = |part: &str, message: String| TemplateProblem {
            part: part.to_owned(),
            line: None,
            column: None,
            message,
        };
        if named(self).is_empty() {
            return Err(problem("parts", "a template needs at least one part".into()));
        }
        if self.push_data.len() > MAX_PUSH_DATA {
            return Err(problem("push_data", format!("at most {MAX_PUSH_DATA} entries")));
        }
        for key in self.push_data.keys() {
            if key.is_empty() || key.len() > 64 {
                return Err(problem("push_data", format!("key {key:?} must be 1 to 64 characters")));
            }
        }
        for (name, source, _) in named(self) {
            if source.len() > MAX_PART_BYTES {
                return Err(problem(
                    &name,
                    format!("{} bytes is over the limit of {MAX_PART_BYTES}", source.len()),
                ));
            }
            let template = Template::compile(source).map_err(|e| {
                let (line, column) = e.pos().map_or((None, None), |(l, c)| (Some(l), Some(c)));
                TemplateProblem { part: name.clone(), line, column, message: e.reason().to_string() }
            })?;
            walk(&template.elements).map_err(|message| problem(&name, message))?;
        }
        Ok(())
    }

    /// Only the parts `channel` shows: what a worker of that channel renders.
    pub fn only(&self, channel: crate::Channel) -> Parts {
        use crate::Channel;
        let p = self.clone();
        match channel {
            Channel::Email => Parts {
                email_subject: p.email_subject,
                email_text: p.email_text,
                email_html: p.email_html,
                email_from: p.email_from,
                email_reply_to: p.email_reply_to,
                ..Parts::default()
            },
            Channel::Sms => Parts { sms_text: p.sms_text, ..Parts::default() },
            Channel::Push => Parts {
                push_title: p.push_title,
                push_body: p.push_body,
                push_data: p.push_data,
                ..Parts::default()
            },
            Channel::Webhook => {
                Parts { webhook_title: p.webhook_title, webhook_body: p.webhook_body, ..Parts::default() }
            }
            Channel::Inapp => {
                Parts { inapp_title: p.inapp_title, inapp_body: p.inapp_body, ..Parts::default() }
            }
        }
    }

    /// The parts with text, by channel: whether the template covers `channel`.
    pub fn covers(&self, channel: crate::Channel) -> bool {
        use crate::Channel;
        match channel {
            Channel::Email => {
                self.email_subject.is_some() || self.email_text.is_some() || self.email_html.is_some()
            }
            Channel::Sms => self.sms_text.is_some(),
            Channel::Push => self.push_title.is_some() || self.push_body.is_some(),
            Channel::Webhook => self.webhook_title.is_some() || self.webhook_body.is_some(),
            Channel::Inapp => self.inapp_title.is_some() || self.inapp_body.is_some(),
        }
    }
}

/// Refuses what a template may not contain, anywhere in it.
fn walk(elements: &[TemplateElement]) -> Result<(), String> {
    for element in elements {
        match element {
            TemplateElement::RawString(_) | TemplateElement::Comment(_) => {}
            TemplateElement::Expression(ht)
            | TemplateElement::HtmlExpression(ht)
            | TemplateElement::HelperBlock(ht) => {
                helper(ht)?;
            }
            TemplateElement::PartialExpression(_) | TemplateElement::PartialBlock(_) => {
                return Err("partials are not supported: a template is self-contained".into());
            }
            TemplateElement::DecoratorExpression(_) | TemplateElement::DecoratorBlock(_) => {
                return Err("decorators and inline partials are not supported".into());
            }
            // A kind of element added by a later handlebars: refuse what is not understood.
            _ => return Err("this template construct is not supported".into()),
        }
    }
    Ok(())
}

fn helper(ht: &HelperTemplate) -> Result<(), String> {
    let call = ht.block || !ht.params.is_empty() || !ht.hash.is_empty();
    if let Some(name) = ht.name.as_name()
        && call
        && !BUILT_IN.contains(&name)
        && !OURS.contains(&name)
    {
        return Err(format!(
            "unknown helper `{name}` (known: {})",
            BUILT_IN.iter().chain(OURS).copied().collect::<Vec<_>>().join(", ")
        ));
    }
    for p in ht.params.iter().chain(ht.hash.values()) {
        if let Parameter::Subexpression(sub) = p {
            walk(std::slice::from_ref(&sub.element))?;
        }
    }
    for t in [&ht.template, &ht.inverse].into_iter().flatten() {
        walk(&t.elements)?;
    }
    Ok(())
}

/// The parts as rendered for one recipient.
pub type Rendered = Parts;

/// Where and for whom a template is rendered.
#[derive(Debug, Clone)]
pub struct Audience {
    /// BCP 47, e.g. `fr-CA`: decides number and date formats.
    pub locale: String,
    /// IANA, e.g. `Europe/Paris`: decides the dates shown.
    pub time_zone: chrono_tz::Tz,
}

impl Default for Audience {
    fn default() -> Audience {
        Audience { locale: "en".into(), time_zone: chrono_tz::UTC }
    }
}

/// Renders templates. Build one and keep it: it holds the helpers, and the parts it has
/// compiled (by source text, so a new version is simply a new entry).
pub struct Renderer {
    text: Handlebars<'static>,
    html: Handlebars<'static>,
    compiled: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<Template>>>,
}

/// Compiled parts kept before the cache starts over (templates are few; data is not cached).
const COMPILED_KEPT: usize = 4096;

impl Default for Renderer {
    fn default() -> Renderer {
        Renderer::new()
    }
}

impl Renderer {
    pub fn new() -> Renderer {
        let build = |escape: bool| {
            let mut h = Handlebars::new();
            h.set_strict_mode(true);
            if escape {
                h.register_escape_fn(handlebars::html_escape);
            } else {
                h.register_escape_fn(handlebars::no_escape);
            }
            h.register_helper("default", Box::new(default_helper));
            h.register_helper("upper", Box::new(upper_helper));
            h.register_helper("lower", Box::new(lower_helper));
            h.register_helper("truncate", Box::new(truncate_helper));
            h.register_helper("number", Box::new(number_helper));
            h.register_helper("date", Box::new(date_helper));
            h
        };
        Renderer { text: build(false), html: build(true), compiled: Default::default() }
    }

    /// Renders every part of `parts` with `data` (a JSON object) for `audience`.
    pub fn render(
        &self,
        parts: &Parts,
        data: &Value,
        audience: &Audience,
    ) -> Result<Rendered, RenderProblem> {
        let problem = |part: &str, message: String| RenderProblem { part: part.to_owned(), message };
        let Value::Object(map) = data else {
            return Err(problem("data", "must be a JSON object".into()));
        };
        if map.contains_key(RESERVED) {
            return Err(problem("data", format!("`{RESERVED}` is reserved")));
        }
        let mut root = map.clone();
        root.insert(
            RESERVED.into(),
            serde_json::json!({"locale": audience.locale, "time_zone": audience.time_zone.name()}),
        );
        let context = Context::wraps(Value::Object(root)).map_err(|e| problem("data", e.to_string()))?;
        let one = |name: &str, source: &String, html: bool| -> Result<String, RenderProblem> {
            let template = self.compiled(source).map_err(|e| problem(name, e.to_string()))?;
            let registry = if html { &self.html } else { &self.text };
            let mut out = StringOutput::new();
            let mut rc = RenderContext::new(None);
            template
                .render(registry, &context, &mut rc, &mut out)
                .map_err(|e| problem(name, describe(&e)))?;
            let text = out.into_string().map_err(|e| problem(name, e.to_string()))?;
            if text.len() > MAX_RENDERED_BYTES {
                return Err(problem(
                    name,
                    format!("renders to {} bytes, over {MAX_RENDERED_BYTES}", text.len()),
                ));
            }
            Ok(text)
        };
        let opt = |name: &str, part: &Option<String>, html: bool| {
            part.as_ref().map(|p| one(name, p, html)).transpose()
        };
        // A sender part renders into a header: it must be one mailbox and nothing else.
        let mailbox = |name: &str, rendered: Option<String>| match rendered {
            Some(m) if !crate::users::is_mailbox(&m) => Err(problem(
                name,
                format!("renders to {m:?}, which is not a mailbox (`Name <address>` or `address`)"),
            )),
            other => Ok(other.map(|m| m.trim().to_owned())),
        };
        let mut push_data = BTreeMap::new();
        for (key, value) in &parts.push_data {
            push_data.insert(key.clone(), one(&format!("push_data.{key}"), value, false)?);
        }
        Ok(Parts {
            email_subject: opt("email_subject", &parts.email_subject, false)?,
            email_text: opt("email_text", &parts.email_text, false)?,
            email_html: opt("email_html", &parts.email_html, true)?,
            email_from: mailbox("email_from", opt("email_from", &parts.email_from, false)?)?,
            email_reply_to: mailbox("email_reply_to", opt("email_reply_to", &parts.email_reply_to, false)?)?,
            sms_text: opt("sms_text", &parts.sms_text, false)?,
            push_title: opt("push_title", &parts.push_title, false)?,
            push_body: opt("push_body", &parts.push_body, false)?,
            push_data,
            webhook_title: opt("webhook_title", &parts.webhook_title, false)?,
            webhook_body: opt("webhook_body", &parts.webhook_body, false)?,
            inapp_title: opt("inapp_title", &parts.inapp_title, false)?,
            inapp_body: opt("inapp_body", &parts.inapp_body, false)?,
        })
    }
}

impl Renderer {
    /// `source` compiled, from the cache when it was compiled before.
    fn compiled(&self, source: &str) -> Result<std::sync::Arc<Template>, handlebars::TemplateError> {
        if let Some(t) = self.compiled.lock().expect("never poisoned").get(source) {
            return Ok(t.clone());
        }
        let template = std::sync::Arc::new(Template::compile(source)?);
        let mut cache = self.compiled.lock().expect("never poisoned");
        if cache.len() >= COMPILED_KEPT {
            cache.clear();
        }
        cache.insert(source.to_owned(), template.clone());
        Ok(template)
    }
}

/// A render error in words a template author acts on.
fn describe(e: &RenderError) -> String {
    let at = match (e.line_no, e.column_no) {
        (Some(l), Some(c)) => format!(" (line {l} column {c})"),
        _ => String::new(),
    };
    match e.reason() {
        RenderErrorReason::MissingVariable(Some(path)) => format!("the data has no `{path}`{at}"),
        reason => format!("{reason}{at}"),
    }
}

/// The audience a helper renders for, from the reserved root key.
fn audience(ctx: &Context) -> (String, chrono_tz::Tz) {
    let meta = &ctx.data()[RESERVED];
    let locale = meta["locale"].as_str().unwrap_or("en").to_owned();
    let tz = meta["time_zone"].as_str().and_then(|t| t.parse().ok()).unwrap_or(chrono_tz::UTC);
    (locale, tz)
}

fn param<'a>(h: &'a Helper, idx: usize, helper: &'static str) -> Result<&'a Value, RenderError> {
    let p = h.param(idx).ok_or(RenderErrorReason::ParamNotFoundForIndex(helper, idx))?;
    if p.is_value_missing() {
        return Err(RenderError::strict_error(p.relative_path()));
    }
    Ok(p.value())
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `{{default value "fallback"}}`: the value, or the fallback when the data lacks it, it is
/// null or an empty string. The one place a missing variable is not an error.
fn default_helper(
    h: &Helper,
    _: &Handlebars,
    _: &Context,
    _: &mut RenderContext,
    out: &mut dyn Output,
) -> HelperResult {
    let value = h.param(0).ok_or(RenderErrorReason::ParamNotFoundForIndex("default", 0))?;
    let fallback = param(h, 1, "default")?;
    let v = value.value();
    let empty = value.is_value_missing() || v.is_null() || v.as_str() == Some("");
    out.write(&text_of(if empty { fallback } else { v }))?;
    Ok(())
}

fn upper_helper(
    h: &Helper,
    _: &Handlebars,
    _: &Context,
    _: &mut RenderContext,
    out: &mut dyn Output,
) -> HelperResult {
    out.write(&text_of(param(h, 0, "upper")?).to_uppercase())?;
    Ok(())
}

fn lower_helper(
    h: &Helper,
    _: &Handlebars,
    _: &Context,
    _: &mut RenderContext,
    out: &mut dyn Output,
) -> HelperResult {
    out.write(&text_of(param(h, 0, "lower")?).to_lowercase())?;
    Ok(())
}

/// `{{truncate text 40}}`: at most 40 characters, the last one `…` when cut.
fn truncate_helper(
    h: &Helper,
    _: &Handlebars,
    _: &Context,
    _: &mut RenderContext,
    out: &mut dyn Output,
) -> HelperResult {
    let text = text_of(param(h, 0, "truncate")?);
    let max =
        param(h, 1, "truncate")?.as_u64().ok_or(RenderErrorReason::InvalidParamType("a length"))? as usize;
    if text.chars().count() <= max {
        out.write(&text)?;
    } else {
        let kept: String = text.chars().take(max.saturating_sub(1)).collect();
        out.write(&format!("{kept}…"))?;
    }
    Ok(())
}

/// `{{number amount}}` or `{{number amount 2}}`: grouped and with the decimal separator of the
/// recipient's locale, rounded to the given decimals (default: as many as it has, up to 6).
fn number_helper(
    h: &Helper,
    _: &Handlebars,
    ctx: &Context,
    _: &mut RenderContext,
    out: &mut dyn Output,
) -> HelperResult {
    let value = param(h, 0, "number")?;
    let n = match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .ok_or(RenderErrorReason::InvalidParamType("a number"))?;
    let decimals = match h.param(1) {
        Some(p) if !p.is_value_missing() => {
            p.value()
                .as_u64()
                .filter(|d| *d <= 6)
                .ok_or(RenderErrorReason::InvalidParamType("0 to 6 decimals"))? as usize
        }
        _ => {
            let s = format!("{n}");
            s.split_once('.').map_or(0, |(_, f)| f.len().min(6))
        }
    };
    let (locale, _) = audience(ctx);
    out.write(&format_number(n, decimals, &locale))?;
    Ok(())
}

/// `n` with `decimals` decimals, grouped as `locale` writes numbers.
pub fn format_number(n: f64, decimals: usize, locale: &str) -> String {
    use num_format::ToFormattedString;
    let fmt = number_locale(locale);
    let fixed = format!("{:.*}", decimals, n.abs());
    let (int, frac) = fixed.split_once('.').unwrap_or((&fixed, ""));
    let int: u64 = int.parse().unwrap_or(0);
    let mut s = String::new();
    if n < 0.0 && fixed.chars().any(|c| c.is_ascii_digit() && c != '0') {
        s.push_str(fmt.minus_sign());
    }
    s.push_str(&int.to_formatted_string(&fmt));
    if !frac.is_empty() {
        s.push_str(fmt.decimal());
        s.push_str(frac);
    }
    s
}

/// The number format of a BCP 47 locale: the region's if known, else the language's, else
/// English.
fn number_locale(locale: &str) -> num_format::Locale {
    let mut tries = Vec::new();
    let mut parts = locale.split('-');
    let lang = parts.next().unwrap_or("en").to_lowercase();
    if let Some(region) =
        parts.find(|p| p.len() == 2 || (p.len() == 3 && p.bytes().all(|b| b.is_ascii_digit())))
    {
        tries.push(format!("{lang}-{}", region.to_uppercase()));
    }
    tries.push(lang);
    tries
        .into_iter()
        .find_map(|name| num_format::Locale::from_name(name).ok())
        .unwrap_or(num_format::Locale::en)
}

/// `{{date when}}` or `{{date when "long"}}`: an RFC 3339 instant or Unix seconds, shown in the
/// recipient's time zone and language. Formats: `short` (the default, the locale's date),
/// `long` (day, month name, year), `time`, `datetime`, or a strftime pattern.
fn date_helper(
    h: &Helper,
    _: &Handlebars,
    ctx: &Context,
    _: &mut RenderContext,
    out: &mut dyn Output,
) -> HelperResult {
    let value = param(h, 0, "date")?;
    let instant: DateTime<Utc> = match value {
        Value::String(s) => DateTime::parse_from_rfc3339(s).map(|d| d.with_timezone(&Utc)).ok(),
        Value::Number(n) => n.as_i64().and_then(|secs| DateTime::from_timestamp(secs, 0)),
        _ => None,
    }
    .ok_or(RenderErrorReason::InvalidParamType("an RFC 3339 date or Unix seconds"))?;
    let style = match h.param(1) {
        Some(p) if !p.is_value_missing() => p.value().as_str().unwrap_or("short").to_owned(),
        _ => "short".to_owned(),
    };
    let (locale, tz) = audience(ctx);
    out.write(&format_date(instant, &style, &locale, tz))?;
    Ok(())
}

/// `instant` in `tz`, written as `locale` writes dates.
pub fn format_date(instant: DateTime<Utc>, style: &str, locale: &str, tz: chrono_tz::Tz) -> String {
    let lang = locale.split('-').next().unwrap_or("en").to_lowercase();
    let pattern = match style {
        "short" => "%x",
        "time" => "%X",
        "datetime" => "%x %X",
        "long" if lang == "en" => "%B %-d, %Y",
        "long" if lang == "de" => "%-d. %B %Y",
        "long" => "%-d %B %Y",
        custom => custom,
    };
    let local = instant.with_timezone(&tz);
    let mut s = String::new();
    // A pattern chrono cannot format writes an error through `fmt`; fall back to RFC 3339.
    if fmt::write(&mut s, format_args!("{}", local.format_localized(pattern, date_locale(locale)))).is_err() {
        return local.to_rfc3339();
    }
    s
}

fn date_locale(locale: &str) -> chrono::Locale {
    let mut parts = locale.split('-');
    let lang = parts.next().unwrap_or("en").to_lowercase();
    let region = parts.find(|p| p.len() == 2).map(str::to_uppercase);
    let mut tries = Vec::new();
    if let Some(r) = &region {
        tries.push(format!("{lang}_{r}"));
    }
    // The language's main region: fr → fr_FR, de → de_DE, en → en_US.
    tries.push(match lang.as_str() {
        "en" => "en_US".to_owned(),
        "pt" => "pt_PT".to_owned(),
        "zh" => "zh_CN".to_owned(),
        "ja" => "ja_JP".to_owned(),
        l => format!("{l}_{}", l.to_uppercase()),
    });
    tries.into_iter().find_map(|t| chrono::Locale::try_from(t.as_str()).ok()).unwrap_or(chrono::Locale::en_US)
}

/// A locale as Herald stores it: BCP 47 language[-Script][-REGION], canonical case (`fr-CA`,
/// `zh-Hant-TW`), or why it is not one.
pub fn canonical_locale(s: &str) -> Result<String, String> {
    let bad = || format!("{s:?} is not a BCP 47 locale such as `en`, `fr-CA` or `zh-Hant-TW`");
    let mut out = Vec::new();
    let mut parts = s.split(['-', '_']);
    let lang =
        parts.next().filter(|l| (2..=3).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_alphabetic()));
    out.push(lang.ok_or_else(bad)?.to_lowercase());
    let mut rest: Vec<&str> = parts.collect();
    if let Some(script) = rest.first().filter(|p| p.len() == 4 && p.bytes().all(|b| b.is_ascii_alphabetic()))
    {
        let mut c = script.to_lowercase();
        c[..1].make_ascii_uppercase();
        out.push(c);
        rest.remove(0);
    }
    if let Some(region) = rest.first() {
        let ok = (region.len() == 2 && region.bytes().all(|b| b.is_ascii_alphabetic()))
            || (region.len() == 3 && region.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            return Err(bad());
        }
        out.push(region.to_uppercase());
        rest.remove(0);
    }
    if !rest.is_empty() {
        return Err(bad());
    }
    Ok(out.join("-"))
}

/// The locales to try for `locale`, most specific first, ending with `default`:
/// `fr-CA` → `fr-CA`, `fr`, `en`.
pub fn fallbacks(locale: &str, default: &str) -> Vec<String> {
    let mut out = Vec::new();
    let parts: Vec<&str> = locale.split('-').collect();
    for n in (1..=parts.len()).rev() {
        out.push(parts[..n].join("-"));
    }
    if !out.iter().any(|l| l == default) {
        out.push(default.to_owned());
    }
    out
}

/// A template code: letters, digits, `_` and `-`, 1 to 64 of them (one KV key token).
pub fn valid_code(code: &str) -> bool {
    (1..=64).contains(&code.len())
        && code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use serde_json::json;

    use super::*;

    fn audience(locale: &str, tz: &str) -> Audience {
        Audience { locale: locale.into(), time_zone: tz.parse().unwrap() }
    }

    /// Renders `source` as a text part (and as an email's HTML part) for each audience, one
    /// line per case, for a golden file.
    fn cases(cases: &[(&str, Value, &str, &str)]) -> String {
        let renderer = Renderer::new();
        let mut out = String::new();
        for (source, data, locale, tz) in cases {
            let parts = Parts {
                sms_text: Some((*source).to_owned()),
                email_html: Some((*source).to_owned()),
                ..Parts::default()
            };
            parts.check().unwrap_or_else(|e| panic!("{source}: {e}"));
            let line = match renderer.render(&parts, data, &audience(locale, tz)) {
                Ok(r) => format!("text {:?} | html {:?}", r.sms_text.unwrap(), r.email_html.unwrap()),
                Err(e) => format!("error: {e}"),
            };
            let _ = writeln!(out, "{source}  [{locale} {tz}] {data}\n    => {line}");
        }
        out
    }

    #[test]
    fn helpers_escaping_and_strict_variables() {
        let when = "2026-11-22T23:30:00Z";
        insta::assert_snapshot!(cases(&[
            ("Hello {{name}}", json!({"name": "Ada"}), "en", "UTC"),
            ("Hello {{name}}", json!({}), "en", "UTC"),
            ("Hello {{user.name}}", json!({"user": {}}), "en", "UTC"),
            ("Hello {{default name \"friend\"}}", json!({}), "en", "UTC"),
            ("Hello {{default name \"friend\"}}", json!({"name": ""}), "en", "UTC"),
            ("Hello {{default name \"friend\"}}", json!({"name": "Ada"}), "en", "UTC"),
            ("{{upper name}} {{lower name}}", json!({"name": "Ada Lovelace"}), "en", "UTC"),
            ("{{upper missing}}", json!({}), "en", "UTC"),
            ("{{truncate text 10}}", json!({"text": "Your order has shipped"}), "en", "UTC"),
            ("{{truncate text 40}}", json!({"text": "Your order has shipped"}), "en", "UTC"),
            ("{{truncate text \"ten\"}}", json!({"text": "x"}), "en", "UTC"),
            ("{{number total}}", json!({"total": 1234567.5}), "en", "UTC"),
            ("{{number total 2}}", json!({"total": 1234567.5}), "fr", "UTC"),
            ("{{number total 2}}", json!({"total": 1234567.5}), "de-DE", "UTC"),
            ("{{number total 0}}", json!({"total": -9876.4}), "en-IN", "UTC"),
            ("{{number total}}", json!({"total": "not a number"}), "en", "UTC"),
            ("{{date at}}", json!({"at": when}), "en-US", "UTC"),
            ("{{date at}}", json!({"at": when}), "en-US", "America/New_York"),
            ("{{date at \"long\"}}", json!({"at": when}), "fr-CA", "Europe/Paris"),
            ("{{date at \"long\"}}", json!({"at": when}), "de", "Europe/Berlin"),
            ("{{date at \"datetime\"}}", json!({"at": when}), "en-GB", "Asia/Tokyo"),
            ("{{date at \"%A %H:%M\"}}", json!({"at": when}), "es", "America/Mexico_City"),
            ("{{date at}}", json!({"at": 1_800_000_000}), "en", "UTC"),
            ("{{date at}}", json!({"at": "yesterday"}), "en", "UTC"),
            ("{{msg}}", json!({"msg": "<b>Tom & \"Jerry\"</b>"}), "en", "UTC"),
            ("{{{msg}}}", json!({"msg": "<b>raw</b>"}), "en", "UTC"),
            (
                "{{#if vip}}Dear VIP{{else}}Hi{{/if}} {{name}}",
                json!({"vip": true, "name": "Ada"}),
                "en",
                "UTC"
            ),
            ("{{#each items}}{{this}};{{/each}}", json!({"items": ["a", "b"]}), "en", "UTC"),
            ("{{#each items}}{{this}};{{/each}}", json!({}), "en", "UTC"),
        ]));
    }

    #[test]
    fn problems_are_found_when_written_with_their_position() {
        let check = |source: &str| {
            let parts = Parts { email_text: Some(source.into()), ..Parts::default() };
            parts.check().map_err(|e| e.to_string())
        };
        insta::assert_snapshot!(
            [
                "Hello {{name",
                "line one\nline two {{#if x}}unclosed",
                "{{#each items}}{{/if}}",
                "{{> footer}}",
                "{{#> layout}}x{{/layout}}",
                "{{*inline \"x\"}}",
                "{{shout name}}",
                "{{upper (shout name)}}",
                "{{#repeat 3}}x{{/repeat}}",
                "fine {{name}} {{upper name}}",
            ]
            .iter()
            .map(|s| format!("{s:?} => {:?}", check(s)))
            .collect::<Vec<_>>()
            .join("\n")
        );
        let huge = Parts { sms_text: Some("x".repeat(MAX_PART_BYTES + 1)), ..Parts::default() };
        assert!(huge.check().unwrap_err().message.contains("over the limit"));
        assert!(Parts::default().check().unwrap_err().message.contains("at least one part"));
        let many = Parts {
            push_data: (0..=MAX_PUSH_DATA).map(|i| (format!("k{i}"), "v".into())).collect(),
            ..Parts::default()
        };
        assert!(many.check().is_err());
    }

    #[test]
    fn a_loop_over_huge_data_is_cut_off_and_reserved_data_is_refused() {
        let parts = Parts { sms_text: Some("{{#each items}}{{this}}{{/each}}".into()), ..Parts::default() };
        let items: Vec<String> = (0..2000).map(|_| "x".repeat(200)).collect();
        let err =
            Renderer::new().render(&parts, &json!({ "items": items }), &Audience::default()).unwrap_err();
        assert!(err.message.contains("over"), "{err}");
        let err = Renderer::new().render(&parts, &json!({RESERVED: 1}), &Audience::default()).unwrap_err();
        assert!(err.message.contains("reserved"));
        let err = Renderer::new().render(&parts, &json!([1]), &Audience::default()).unwrap_err();
        assert!(err.message.contains("object"));
    }

    #[test]
    fn locales_are_canonical_and_fall_back_to_the_language_then_the_default() {
        assert_eq!(canonical_locale("fr-ca").unwrap(), "fr-CA");
        assert_eq!(canonical_locale("zh_hant_tw").unwrap(), "zh-Hant-TW");
        assert_eq!(canonical_locale("es-419").unwrap(), "es-419");
        assert_eq!(canonical_locale("EN").unwrap(), "en");
        for bad in ["", "e", "english", "fr-CAN", "fr-CA-x", "../etc", "fr CA", "12"] {
            assert!(canonical_locale(bad).is_err(), "{bad}");
        }
        assert_eq!(fallbacks("fr-CA", "en"), ["fr-CA", "fr", "en"]);
        assert_eq!(fallbacks("zh-Hant-TW", "en"), ["zh-Hant-TW", "zh-Hant", "zh", "en"]);
        assert_eq!(fallbacks("en-GB", "en"), ["en-GB", "en"]);
        assert!(valid_code("order_shipped-v2") && !valid_code("a.b") && !valid_code("") && !valid_code("*"));
    }
}
