//! Scope rules: which providers, methods and paths a session may call.
//!
//! On the command line a rule is `PROVIDER:METHODS:PATH`
//! (`openai:POST:/v1/chat/completions`, `github:GET,HEAD:/repos/acme/**`); in
//! JSON it is `{"provider": .., "methods": [..], "paths": [..]}`. METHODS is a
//! comma list or `*`; besides the HTTP methods it may name `WEBSOCKET`,
//! which grants WebSocket handshakes (a `GET` with `Upgrade: websocket`) on
//! the rule's paths — `GET` alone does not — and which `*` includes. In a
//! path pattern `*` matches exactly one segment, a
//! trailing `/**` matches any number of further segments (including none),
//! and anything else is literal, compared byte for byte with the request path.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::object_only::ObjectOnly;
use crate::path::{self, PathError, ValidPath};

/// An HTTP method a scope may grant, or [`Method::WebSocket`]. `CONNECT`,
/// `TRACE` and extension methods are never forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
    /// A WebSocket handshake (`GET` with `Upgrade: websocket`): a tunnel for
    /// as long as the session lives, so it is granted by name (`WEBSOCKET`),
    /// never by `GET`. No request's own method is ever this one.
    WebSocket,
}

/// A set of methods, as a bit mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MethodSet(u8);

/// A parsed path pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathPattern {
    source: String,
    segments: Vec<PatternSegment>,
    /// Ends in `/**`.
    any_rest: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum PatternSegment {
    Literal(String),
    AnyOne,
}

/// One grant: a provider, the methods and the path patterns it may use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ObjectOnly<RawRule>", into = "RawRule")]
pub struct Rule {
    provider: String,
    methods: MethodSet,
    paths: Vec<PathPattern>,
}

/// The JSON form of a rule.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    provider: String,
    methods: Vec<String>,
    paths: Vec<String>,
}

/// Everything a session may call: a list of rules, any of which may allow a call.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Scope(Vec<Rule>);

/// Why a rule, method or pattern was refused. The text names the bad part.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("rule {0:?} is not PROVIDER:METHODS:PATH")]
    Shape(String),
    #[error("provider name {0:?} must be 1-64 characters of a-z, 0-9, '-' or '_'")]
    Provider(String),
    #[error(
        "method {0:?} is not one of GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, WEBSOCKET or \
         '*'{hint}",
        hint = case_hint(.0)
    )]
    Method(String),
    #[error(
        "rule {rule:?} contains {what}: a rule holds no whitespace \
         (PROVIDER:METHODS:PATH, e.g. openai:POST:/v1/chat/completions)"
    )]
    Whitespace { rule: String, what: String },
    #[error("a rule needs at least one method")]
    NoMethods,
    #[error("a rule needs at least one path")]
    NoPaths,
    #[error("path pattern {pattern:?}: {reason}")]
    Pattern { pattern: String, reason: String },
    #[error("a scope needs at least one rule")]
    EmptyScope,
}

/// `; methods are upper case: did you mean POST?` for a method that is one
/// in another case (methods are compared exactly, as HTTP does), else
/// nothing.
fn case_hint(name: &str) -> String {
    match Method::parse(&name.to_ascii_uppercase()) {
        Some(method) => format!("; methods are upper case: did you mean {method}?"),
        None => String::new(),
    }
}

// === impl Method ===

impl Method {
    /// All methods a scope can grant.
    pub const ALL: [Method; 8] = [
        Method::Get,
        Method::Head,
        Method::Post,
        Method::Put,
        Method::Patch,
        Method::Delete,
        Method::Options,
        Method::WebSocket,
    ];

    /// The method of a request whose method is `name` (upper case, exactly);
    /// `None` for a method never forwarded — and for `WEBSOCKET`, which
    /// names a handshake in a rule but is no request's method.
    pub fn of_request(name: &str) -> Option<Self> {
        Self::parse(name).filter(|m| *m != Self::WebSocket)
    }

    /// Parses an upper-case method name of a rule exactly; anything else is
    /// `None`.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "GET" => Self::Get,
            "HEAD" => Self::Head,
            "POST" => Self::Post,
            "PUT" => Self::Put,
            "PATCH" => Self::Patch,
            "DELETE" => Self::Delete,
            "OPTIONS" => Self::Options,
            "WEBSOCKET" => Self::WebSocket,
            _ => return None,
        })
    }

    /// The upper-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Head => "HEAD",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Patch => "PATCH",
            Self::Delete => "DELETE",
            Self::Options => "OPTIONS",
            Self::WebSocket => "WEBSOCKET",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl MethodSet ===

impl MethodSet {
    /// Every method a scope can grant.
    pub fn all() -> Self {
        Method::ALL.iter().fold(Self(0), |set, m| set.with(*m))
    }

    /// The set plus `method`.
    pub fn with(self, method: Method) -> Self {
        Self(self.0 | method.bit())
    }

    /// Whether `method` is in the set.
    pub fn contains(self, method: Method) -> bool {
        self.0 & method.bit() != 0
    }

    /// Parses names such as `["GET","HEAD"]` or `["*"]`. Spaces around a
    /// name are ignored (the JSON form has always taken them; a RULE on the
    /// command line refuses any whitespace before it gets here).
    pub fn parse<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, RuleError> {
        let mut set = Self(0);
        for name in names {
            let name = name.trim();
            if name == "*" {
                set = Self::all();
            } else {
                set = set.with(Method::parse(name).ok_or_else(|| RuleError::Method(name.into()))?);
            }
        }
        if set.0 == 0 {
            return Err(RuleError::NoMethods);
        }
        Ok(set)
    }

    /// The names in the set (`["*"]` when it holds all of them).
    pub fn names(self) -> Vec<String> {
        if self == Self::all() {
            return vec!["*".to_owned()];
        }
        Method::ALL
            .iter()
            .filter(|m| self.contains(**m))
            .map(|m| m.as_str().to_owned())
            .collect()
    }
}

// === impl PathPattern ===

impl PathPattern {
    /// Whether the request path `path` matches. A path that
    /// [`path::validate`] refuses (dot segments, encoded separators, ...)
    /// matches nothing, even where the caller forgot to validate it.
    pub fn matches(&self, path: &str) -> bool {
        path::validate(path).is_ok() && self.matches_valid(path)
    }

    /// [`PathPattern::matches`] for a path already known to pass
    /// [`path::validate`] (checked once per call, not once per pattern).
    fn matches_valid(&self, path: &str) -> bool {
        let rest = path.strip_prefix('/').unwrap_or(path);
        // Split as bytes: a `char` pattern costs a searcher per segment.
        let mut request =
            (!rest.is_empty() || path.is_empty()).then(|| rest.as_bytes().split(|&b| b == b'/'));
        for pattern in &self.segments {
            let Some(segment) = request.as_mut().and_then(Iterator::next) else {
                return false;
            };
            match pattern {
                PatternSegment::AnyOne if segment.is_empty() => return false,
                PatternSegment::AnyOne => {}
                PatternSegment::Literal(lit) if lit.as_bytes() != segment => return false,
                PatternSegment::Literal(_) => {}
            }
        }
        self.any_rest || request.is_none_or(|mut rest| rest.next().is_none())
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl FromStr for PathPattern {
    type Err = RuleError;

    fn from_str(source: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| RuleError::Pattern {
            pattern: source.to_owned(),
            reason: reason.to_owned(),
        };
        // A session token pasted into a rule would be stored and shown
        // with the scope, and match nothing: calls whose path holds a
        // token are refused. Not quoted back.
        if let Some(withheld) = crate::token::withhold_runs(source) {
            return Err(RuleError::Pattern {
                pattern: withheld,
                reason: "holds a session token (no call's path may: such a call is refused)"
                    .to_owned(),
            });
        }
        let body = source
            .strip_prefix('/')
            .ok_or_else(|| fail("must start with '/'"))?;
        let (body, any_rest) = match body.strip_suffix("**") {
            Some("") => ("", true),
            Some(prefix) => (
                prefix
                    .strip_suffix('/')
                    .ok_or_else(|| fail("'**' must be a whole last segment"))?,
                true,
            ),
            None => (body, false),
        };
        let mut segments = Vec::new();
        if !body.is_empty() {
            for segment in body.split('/') {
                segments.push(match segment {
                    "*" => PatternSegment::AnyOne,
                    s if s.contains('*') => {
                        return Err(fail("'*' must be a whole segment; '**' only at the end"))
                    }
                    "" => return Err(fail("empty segment")),
                    s => {
                        path::validate_segment(s, false)
                            .map_err(|e: PathError| fail(&e.to_string()))?;
                        PatternSegment::Literal(s.to_owned())
                    }
                });
            }
        }
        Ok(Self {
            source: source.to_owned(),
            segments,
            any_rest,
        })
    }
}

// === impl Rule ===

impl Rule {
    /// Builds a rule from its parts.
    pub fn new(
        provider: &str,
        methods: MethodSet,
        paths: Vec<PathPattern>,
    ) -> Result<Self, RuleError> {
        validate_provider(provider)?;
        if paths.is_empty() {
            return Err(RuleError::NoPaths);
        }
        Ok(Self {
            provider: provider.to_owned(),
            methods,
            paths,
        })
    }

    /// The provider this rule grants.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// The path patterns this rule grants.
    pub fn paths(&self) -> &[PathPattern] {
        &self.paths
    }

    /// Whether this rule allows `method` on `path` of `provider`.
    pub fn allows(&self, provider: &str, method: Method, path: &str) -> bool {
        path::validate(path).is_ok() && self.allows_valid(provider, method, path)
    }

    /// [`Rule::allows`] for a path already validated.
    fn allows_valid(&self, provider: &str, method: Method, path: &str) -> bool {
        self.provider == provider
            && self.methods.contains(method)
            && self.paths.iter().any(|p| p.matches_valid(path))
    }
}

/// Provider names: lower-case letters, digits, `-`, `_`; at most 64 bytes.
pub fn validate_provider(name: &str) -> Result<(), RuleError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(RuleError::Provider(name.to_owned()))
    }
}

impl FromStr for Rule {
    type Err = RuleError;

    /// Parses `PROVIDER:METHODS:PATH`. Whitespace is refused wherever it
    /// is (no part of a rule holds any: a space after a `:` or `,` is a
    /// typo, and one in the path could never match).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(c) = s.chars().find(|c| c.is_whitespace()) {
            return Err(RuleError::Whitespace {
                rule: s.to_owned(),
                what: path::describe_char(c),
            });
        }
        let shape = || RuleError::Shape(s.to_owned());
        let (provider, rest) = s.split_once(':').ok_or_else(shape)?;
        let (methods, path) = rest.split_once(':').ok_or_else(shape)?;
        if methods.is_empty() || path.is_empty() {
            return Err(shape());
        }
        Self::new(
            provider,
            MethodSet::parse(methods.split(','))?,
            vec![path.parse()?],
        )
    }
}

impl TryFrom<ObjectOnly<RawRule>> for Rule {
    type Error = RuleError;

    fn try_from(raw: ObjectOnly<RawRule>) -> Result<Self, Self::Error> {
        Self::try_from(raw.0)
    }
}

impl TryFrom<RawRule> for Rule {
    type Error = RuleError;

    fn try_from(raw: RawRule) -> Result<Self, Self::Error> {
        let paths = raw
            .paths
            .iter()
            .map(|p| p.parse())
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(
            &raw.provider,
            MethodSet::parse(raw.methods.iter().map(String::as_str))?,
            paths,
        )
    }
}

impl From<Rule> for RawRule {
    fn from(rule: Rule) -> Self {
        Self {
            provider: rule.provider,
            methods: rule.methods.names(),
            paths: rule.paths.into_iter().map(|p| p.source).collect(),
        }
    }
}

// === impl Scope ===

impl Scope {
    /// A scope of the given rules; at least one is required.
    pub fn new(rules: Vec<Rule>) -> Result<Self, RuleError> {
        if rules.is_empty() {
            return Err(RuleError::EmptyScope);
        }
        Ok(Self(rules))
    }

    /// Whether any rule allows the call. A path the validator refuses
    /// matches no pattern.
    pub fn allows(&self, provider: &str, method: Method, path: &str) -> bool {
        path::validate(path).is_ok_and(|path| self.allows_valid(provider, method, path))
    }

    /// [`Scope::allows`] for a path already validated (the request path:
    /// validated once per call, not once per pattern or per caller).
    pub fn allows_valid(&self, provider: &str, method: Method, path: ValidPath<'_>) -> bool {
        self.0
            .iter()
            .any(|r| r.allows_valid(provider, method, path.as_str()))
    }

    /// The rules.
    pub fn rules(&self) -> &[Rule] {
        &self.0
    }

    /// The path patterns of all rules together (what a call that no rule
    /// allows is matched against).
    pub fn pattern_count(&self) -> usize {
        self.0.iter().map(|r| r.paths.len()).sum()
    }

    /// The distinct providers named by the rules, in first-seen order.
    pub fn providers(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for rule in &self.0 {
            if !out.contains(&rule.provider()) {
                out.push(rule.provider());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
