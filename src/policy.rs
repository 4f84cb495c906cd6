//! Authorization policy: which peer SPIFFE IDs a tunnel accepts.
//!
//! This module owns the rule syntax shared by policy files and the config's
//! `allow = [...]` lists, its validation, and the compiled matcher that the
//! TLS verifier consults on every handshake. Keeping all three together means
//! there is exactly one definition of what a pattern means, so a rule cannot
//! be read one way when it is checked and another way when it is enforced.
//!
//! # Syntax
//!
//! One rule per line (or per list entry):
//!
//! ```text
//! spiffe://example.org/web             # exactly this ID
//! spiffe://example.org/ns/prod/*       # exactly one more path segment
//! spiffe://example.org/ns/*/sa/web     # `*` may be any whole segment
//! spiffe://example.org/ns/prod/**      # one or more more path segments
//! spiffe://partner.org/**              # any workload of that trust domain
//! allow spiffe://example.org/api       # same as the bare pattern
//! deny spiffe://example.org/ns/prod/legacy
//! ```
//!
//! `#` starts a comment anywhere on a line, blank lines are skipped and
//! surrounding whitespace is ignored. The trust domain is always literal; a
//! wildcard must be a whole path segment and `**` may only be the last one.
//! Every pattern, with its wildcards replaced by a literal, must be a
//! canonical SPIFFE ID with a path (X509-SVIDs never carry a root ID).
//!
//! # Semantics
//!
//! A `deny` rule that matches wins over any `allow`; an ID no rule matches is
//! denied, so an empty policy denies everyone. Path matching is
//! case-sensitive, as SPIFFE paths are.
//!
//! # Matching
//!
//! [`Policy::compile`] builds two tries (allow and deny), keyed by trust
//! domain and then by path segment, so a decision costs a walk over the ID's
//! segments whatever the number of rules, and does not allocate.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::str::Split;

use crate::spiffe_id::{self, SpiffeId};

const SCHEME: &str = "spiffe://";

/// What a rule does to the IDs it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
}

/// One policy rule, as parsed from a line or a config entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub effect: Effect,
    /// The pattern as written, e.g. `spiffe://example.org/ns/*`.
    pub pattern: String,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.effect {
            Effect::Allow => f.write_str(&self.pattern),
            Effect::Deny => write!(f, "deny {}", self.pattern),
        }
    }
}

/// A malformed rule, located by origin (file path or config key) and 1-based
/// line (or entry) number; line 0 means the source could not be read at all.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{origin}:{line}: {message}")]
pub struct PolicyError {
    pub origin: String,
    pub line: usize,
    pub message: String,
}

/// Parses one line or config entry.
///
/// Returns `Ok(None)` for a blank or comment-only line. The error is a reason
/// that quotes the offending text; callers add the origin and line number.
pub fn parse_rule(text: &str) -> Result<Option<Rule>, String> {
    let text = match text.find('#') {
        Some(i) => &text[..i],
        None => text,
    };
    let mut tokens = text.split_whitespace();
    let Some(first) = tokens.next() else {
        return Ok(None);
    };
    let (effect, pattern) = match first {
        "allow" | "deny" => {
            let effect = if first == "deny" {
                Effect::Deny
            } else {
                Effect::Allow
            };
            let Some(pattern) = tokens.next() else {
                return Err(format!(
                    "`{first}` needs a pattern, like `{first} spiffe://example.org/web`"
                ));
            };
            (effect, pattern)
        }
        _ if first.contains("://") => (Effect::Allow, first),
        _ => {
            if tokens.next().is_none() {
                // A lone word: most likely a pattern missing its scheme.
                (Effect::Allow, first)
            } else {
                let hint =
                    if first.eq_ignore_ascii_case("allow") || first.eq_ignore_ascii_case("deny") {
                        " (keywords are lower case)"
                    } else {
                        ""
                    };
                return Err(format!(
                    "unknown keyword `{first}`{hint}: a rule is `PATTERN`, `allow PATTERN` or `deny PATTERN`"
                ));
            }
        }
    };
    if tokens.next().is_some() {
        return Err(format!(
            "`{}`: only one pattern per line is allowed",
            text.trim()
        ));
    }
    validate_pattern(pattern).map_err(|reason| format!("`{pattern}`: {reason}"))?;
    Ok(Some(Rule {
        effect,
        pattern: pattern.to_string(),
    }))
}

/// Parses a whole policy file's text; `origin` names it in errors.
pub fn parse_rules(text: &str, origin: &str) -> Result<Vec<Rule>, PolicyError> {
    let mut rules = Vec::new();
    for (index, line) in text.lines().enumerate() {
        match parse_rule(line) {
            Ok(Some(rule)) => rules.push(rule),
            Ok(None) => {}
            Err(message) => {
                return Err(PolicyError {
                    origin: origin.to_string(),
                    line: index + 1,
                    message,
                })
            }
        }
    }
    Ok(rules)
}

/// Reads and parses a policy file.
pub fn load_file(path: &Path) -> Result<Vec<Rule>, PolicyError> {
    let origin = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse_rules(&text, &origin),
        Err(e) => Err(PolicyError {
            origin,
            line: 0,
            message: format!("cannot read policy file: {e}"),
        }),
    }
}

/// Checks a pattern's shape and, with wildcards replaced by literals, that it
/// is a canonical SPIFFE ID with a path.
fn validate_pattern(pattern: &str) -> Result<(), String> {
    let Some((authority, path)) = split_pattern(pattern) else {
        // No (lower-case) scheme: let the ID parser say what is wrong.
        return spiffe_id::parse(pattern)
            .map(drop)
            .map_err(|e| e.to_string());
    };
    if authority.contains('*') {
        return Err(
            "the trust domain must be literal; wildcards are allowed only as whole path segments"
                .into(),
        );
    }
    let Some(path) = path else {
        spiffe_id::parse(pattern).map_err(|e| e.to_string())?;
        return Err(format!(
            "a pattern needs a path: X509-SVIDs never carry a root ID like this; \
             to match every workload of the trust domain write `{SCHEME}{authority}/**`"
        ));
    };
    if path.is_empty() {
        return Err(format!(
            "trailing `/` is not allowed; to match everything below it write `{pattern}**`"
        ));
    }
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.len() - 1;
    let mut literal = String::with_capacity(pattern.len());
    literal.push_str(SCHEME);
    literal.push_str(authority);
    for (i, segment) in segments.iter().enumerate() {
        literal.push('/');
        match *segment {
            "" if i == last => {
                let trimmed = pattern.trim_end_matches('/');
                return Err(format!(
                    "trailing `/` is not allowed; write `{trimmed}` for the ID itself or `{trimmed}/**` for everything below it"
                ));
            }
            "" => return Err("empty path segment (`//`)".into()),
            "*" => literal.push('x'),
            "**" if i == last => literal.push_str("xx"),
            "**" => {
                return Err("`**` is allowed only as the last path segment".into());
            }
            s if s.contains('*') => {
                return Err(format!(
                    "a wildcard must be a whole path segment (`*` or `**`), not part of one like `{s}`"
                ));
            }
            s => literal.push_str(s),
        }
    }
    // Same length as the pattern, so the ID length limit applies as written.
    spiffe_id::parse(&literal).map_err(|e| e.to_string())?;
    Ok(())
}

/// Splits `spiffe://AUTHORITY[/PATH]` into the authority and the path after
/// its leading `/` (`None` if there is no path at all). `None` overall if the
/// scheme is missing.
fn split_pattern(pattern: &str) -> Option<(&str, Option<&str>)> {
    let rest = pattern.strip_prefix(SCHEME)?;
    Some(match rest.split_once('/') {
        Some((authority, path)) => (authority, Some(path)),
        None => (rest, None),
    })
}

/// The outcome of matching an ID against a policy. The string is the
/// deciding pattern as written; if several rules of the winning effect
/// match, it is the one that came first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<'a> {
    Allowed(&'a str),
    Denied(&'a str),
    NoMatch,
}

/// A compiled, immutable policy.
///
/// Rules are expected to come from [`parse_rule`]. A rule built by hand whose
/// pattern is not valid fails closed: as an allow it matches nothing, as a
/// deny it matches every ID.
#[derive(Debug, Default)]
pub struct Policy {
    rules: Vec<Rule>,
    allow: Trie,
    deny: Trie,
    /// First invalid deny rule, if any: it denies everyone.
    deny_all: Option<usize>,
}

/// Patterns of one effect, by trust domain then path segment.
#[derive(Debug, Default)]
struct Trie {
    domains: HashMap<Box<str>, Node>,
}

#[derive(Debug, Default)]
struct Node {
    literal: HashMap<Box<str>, Node>,
    star: Option<Box<Node>>,
    /// A pattern ends exactly here (index of its first rule).
    exact: Option<usize>,
    /// A `**` pattern ends here: matches one or more remaining segments.
    rest: Option<usize>,
}

impl Trie {
    fn insert(&mut self, authority: &str, path: &str, index: usize) {
        let mut node = self.domains.entry(authority.into()).or_default();
        let mut segments = path.split('/').peekable();
        while let Some(segment) = segments.next() {
            if segment == "**" && segments.peek().is_none() {
                node.rest.get_or_insert(index);
                return;
            }
            node = if segment == "*" {
                node.star.get_or_insert_with(Box::default).as_mut()
            } else {
                node.literal.entry(segment.into()).or_default()
            };
        }
        node.exact.get_or_insert(index);
    }

    /// Index of the first rule matching the ID, if any.
    fn find(&self, trust_domain: &str, path: &str) -> Option<usize> {
        let node = self.domains.get(trust_domain)?;
        // Patterns always have a path, so a root ID matches nothing.
        let path = path.strip_prefix('/')?;
        let mut best = None;
        node.find(path.split('/'), &mut best);
        best
    }
}

impl Node {
    /// Records in `best` the lowest rule index matching the remaining
    /// segments. Each node is visited at most once per ID (it stands for one
    /// prefix length), so this is bounded by the trie size.
    fn find(&self, mut segments: Split<'_, char>, best: &mut Option<usize>) {
        let Some(segment) = segments.next() else {
            keep_lowest(best, self.exact);
            return;
        };
        keep_lowest(best, self.rest);
        if let Some(child) = self.literal.get(segment) {
            child.find(segments.clone(), best);
        }
        if let Some(star) = &self.star {
            star.find(segments, best);
        }
    }
}

fn keep_lowest(best: &mut Option<usize>, found: Option<usize>) {
    if let Some(i) = found {
        if best.is_none_or(|b| i < b) {
            *best = Some(i);
        }
    }
}

impl Policy {
    /// Compiles rules; their order only decides which pattern a
    /// [`Decision`] reports.
    pub fn compile(rules: impl IntoIterator<Item = Rule>) -> Policy {
        let mut policy = Policy {
            rules: rules.into_iter().collect(),
            ..Policy::default()
        };
        for (index, rule) in policy.rules.iter().enumerate() {
            let parsed = validate_pattern(&rule.pattern)
                .ok()
                .and_then(|()| split_pattern(&rule.pattern));
            match (&rule.effect, parsed) {
                (Effect::Allow, Some((authority, Some(path)))) => {
                    policy.allow.insert(authority, path, index)
                }
                (Effect::Deny, Some((authority, Some(path)))) => {
                    policy.deny.insert(authority, path, index)
                }
                (Effect::Allow, _) => {}
                (Effect::Deny, _) => {
                    policy.deny_all.get_or_insert(index);
                }
            }
        }
        policy
    }

    /// Decides whether `id` is allowed: a matching deny wins, then a matching
    /// allow, and otherwise nothing matched (which callers treat as denied).
    pub fn decide(&self, id: &SpiffeId) -> Decision<'_> {
        let trust_domain = id.trust_domain().as_str();
        let path = id.path();
        let mut deny = self.deny.find(trust_domain, path);
        keep_lowest(&mut deny, self.deny_all);
        if let Some(i) = deny {
            return Decision::Denied(&self.rules[i].pattern);
        }
        match self.allow.find(trust_domain, path) {
            Some(i) => Decision::Allowed(&self.rules[i].pattern),
            None => Decision::NoMatch,
        }
    }

    /// True only if an allow rule matches and no deny rule does.
    pub fn allows(&self, id: &SpiffeId) -> bool {
        matches!(self.decide(id), Decision::Allowed(_))
    }

    /// Number of rules compiled (duplicates included).
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// True if the policy has no rules (and so denies everyone).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        spiffe_id::parse(s).unwrap()
    }

    fn policy(text: &str) -> Policy {
        Policy::compile(parse_rules(text, "test").unwrap())
    }

    fn allow(text: &str, who: &str) -> bool {
        policy(text).allows(&id(who))
    }

    fn line_error(text: &str) -> PolicyError {
        parse_rules(text, "policy.txt").expect_err("malformed policy accepted")
    }

    #[test]
    fn policy_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Policy>();
    }

    #[test]
    fn exact_pattern() {
        let p = "spiffe://td/web";
        assert!(allow(p, "spiffe://td/web"));
        assert!(!allow(p, "spiffe://td/webx"));
        assert!(!allow(p, "spiffe://td/we"));
        assert!(!allow(p, "spiffe://td/web/x"));
        assert!(!allow(p, "spiffe://td"));
        assert!(!allow(p, "spiffe://other/web"));
    }

    #[test]
    fn path_is_case_sensitive() {
        assert!(!allow("spiffe://td/web", "spiffe://td/Web"));
        assert!(allow("spiffe://td/Web", "spiffe://td/Web"));
    }

    #[test]
    fn star_last_is_exactly_one_segment() {
        let p = "spiffe://td/ns/prod/*";
        assert!(allow(p, "spiffe://td/ns/prod/web"));
        assert!(allow(p, "spiffe://td/ns/prod/db"));
        assert!(!allow(p, "spiffe://td/ns/prod"));
        assert!(!allow(p, "spiffe://td/ns/prod/web/x"));
        assert!(!allow(p, "spiffe://td/ns/prodx/web"));
        assert!(!allow(p, "spiffe://td/ns/dev/web"));
    }

    #[test]
    fn star_in_the_middle() {
        let p = "spiffe://td/ns/*/sa/web";
        assert!(allow(p, "spiffe://td/ns/prod/sa/web"));
        assert!(allow(p, "spiffe://td/ns/dev/sa/web"));
        assert!(!allow(p, "spiffe://td/ns/sa/web"));
        assert!(!allow(p, "spiffe://td/ns/a/b/sa/web"));
        assert!(!allow(p, "spiffe://td/ns/prod/sa/db"));
        assert!(!allow(p, "spiffe://td/ns/prod/sa/web/x"));
    }

    #[test]
    fn star_backtracks_to_literal_sibling() {
        // The literal branch `a/b/c` fails at the end; `*/b/d` must still match.
        let p = "spiffe://td/a/b/c\nspiffe://td/*/b/d\nspiffe://td/*/*/*/**";
        let pol = policy(p);
        assert_eq!(
            pol.decide(&id("spiffe://td/a/b/d")),
            Decision::Allowed("spiffe://td/*/b/d")
        );
        assert_eq!(
            pol.decide(&id("spiffe://td/a/b/c")),
            Decision::Allowed("spiffe://td/a/b/c")
        );
        assert_eq!(
            pol.decide(&id("spiffe://td/a/b/c/d")),
            Decision::Allowed("spiffe://td/*/*/*/**")
        );
        assert_eq!(pol.decide(&id("spiffe://td/a/x/d")), Decision::NoMatch);
    }

    #[test]
    fn double_star_is_one_or_more_segments() {
        let p = "spiffe://td/ns/prod/**";
        assert!(allow(p, "spiffe://td/ns/prod/web"));
        assert!(allow(p, "spiffe://td/ns/prod/a/b/c"));
        assert!(!allow(p, "spiffe://td/ns/prod"));
        assert!(!allow(p, "spiffe://td/ns/prodx/web"));
        assert!(!allow(p, "spiffe://td/ns"));
    }

    #[test]
    fn whole_trust_domain() {
        let p = "spiffe://partner.org/**";
        assert!(allow(p, "spiffe://partner.org/x"));
        assert!(allow(p, "spiffe://partner.org/a/b/c"));
        assert!(!allow(p, "spiffe://partner.org"));
        assert!(!allow(p, "spiffe://other.org/x"));
    }

    #[test]
    fn trust_domains_never_match_each_other() {
        assert!(!allow("spiffe://a.org/**", "spiffe://b.org/x"));
        assert!(!allow(
            "spiffe://example.org/**",
            "spiffe://example.org.evil.com/x"
        ));
        assert!(!allow(
            "spiffe://example.org/web",
            "spiffe://example.org.evil.com/web"
        ));
        assert!(!allow(
            "spiffe://example.org/*",
            "spiffe://evil.example.org/web"
        ));
        assert!(!allow(
            "spiffe://example.org/*",
            "spiffe://xexample.org/web"
        ));
    }

    #[test]
    fn deny_wins_over_allow() {
        let pol = policy(
            "spiffe://td/ns/prod/**\n\
             deny spiffe://td/ns/prod/legacy\n",
        );
        assert_eq!(
            pol.decide(&id("spiffe://td/ns/prod/legacy")),
            Decision::Denied("spiffe://td/ns/prod/legacy")
        );
        assert!(!pol.allows(&id("spiffe://td/ns/prod/legacy")));
        assert_eq!(
            pol.decide(&id("spiffe://td/ns/prod/web")),
            Decision::Allowed("spiffe://td/ns/prod/**")
        );
        // The deny is exact: deeper IDs are still allowed.
        assert!(pol.allows(&id("spiffe://td/ns/prod/legacy/x")));

        // Order does not matter: a broad deny beats a later or earlier exact allow.
        for text in [
            "deny spiffe://td/**\nspiffe://td/web",
            "spiffe://td/web\ndeny spiffe://td/**",
        ] {
            let pol = policy(text);
            assert_eq!(
                pol.decide(&id("spiffe://td/web")),
                Decision::Denied("spiffe://td/**"),
                "{text}"
            );
        }
    }

    #[test]
    fn empty_policy_denies_everyone() {
        let pol = Policy::compile(Vec::new());
        assert!(pol.is_empty());
        assert_eq!(pol.len(), 0);
        assert_eq!(pol.decide(&id("spiffe://td/web")), Decision::NoMatch);
        assert!(!pol.allows(&id("spiffe://td/web")));
        assert!(!Policy::default().allows(&id("spiffe://td/web")));
        // Only denies: still nothing is allowed.
        let pol = policy("deny spiffe://td/x");
        assert_eq!(pol.decide(&id("spiffe://td/web")), Decision::NoMatch);
    }

    #[test]
    fn decision_reports_first_matching_pattern_as_written() {
        let pol = policy(
            "spiffe://td/ns/*\n\
             spiffe://td/**\n\
             spiffe://td/ns/web\n\
             deny spiffe://td/ns/*/old\n\
             deny spiffe://td/ns/db/**\n",
        );
        assert_eq!(pol.len(), 5);
        assert_eq!(
            pol.decide(&id("spiffe://td/ns/web")),
            Decision::Allowed("spiffe://td/ns/*")
        );
        assert_eq!(
            pol.decide(&id("spiffe://td/other")),
            Decision::Allowed("spiffe://td/**")
        );
        assert_eq!(
            pol.decide(&id("spiffe://td/ns/db/old")),
            Decision::Denied("spiffe://td/ns/*/old")
        );
        assert_eq!(
            pol.decide(&id("spiffe://td/ns/db/new")),
            Decision::Denied("spiffe://td/ns/db/**")
        );
        assert_eq!(pol.decide(&id("spiffe://x.org/ns/web")), Decision::NoMatch);
    }

    #[test]
    fn duplicates_count_and_report_the_first() {
        let pol = policy("spiffe://td/a\nspiffe://td/a");
        assert_eq!(pol.len(), 2);
        assert_eq!(
            pol.decide(&id("spiffe://td/a")),
            Decision::Allowed("spiffe://td/a")
        );
    }

    #[test]
    fn invalid_hand_built_rules_fail_closed() {
        let bad_allow = Rule {
            effect: Effect::Allow,
            pattern: "spiffe://TD/**".into(),
        };
        let bad_deny = Rule {
            effect: Effect::Deny,
            pattern: "spiffe://Example.org/web".into(),
        };
        let good = Rule {
            effect: Effect::Allow,
            pattern: "spiffe://example.org/**".into(),
        };
        let pol = Policy::compile([bad_allow.clone()]);
        assert_eq!(pol.decide(&id("spiffe://td/x")), Decision::NoMatch);
        let pol = Policy::compile([good, bad_allow, bad_deny]);
        assert_eq!(
            pol.decide(&id("spiffe://example.org/other")),
            Decision::Denied("spiffe://Example.org/web")
        );
    }

    #[test]
    fn comments_blank_lines_whitespace_and_allow_keyword() {
        let text = "# a policy\n\
                    \n\
                    \t  spiffe://td/a   # trailing comment\n\
                    allow spiffe://td/b\n\
                    allow\t spiffe://td/c#no space before comment\n\
                    \x20  deny   spiffe://td/d  \n\
                    \x20  # indented comment\n\
                    #deny spiffe://td/e\n\
                    \r\n";
        let rules = parse_rules(text, "test").unwrap();
        let expected = [
            (Effect::Allow, "spiffe://td/a"),
            (Effect::Allow, "spiffe://td/b"),
            (Effect::Allow, "spiffe://td/c"),
            (Effect::Deny, "spiffe://td/d"),
        ];
        assert_eq!(rules.len(), expected.len());
        for (rule, (effect, pattern)) in rules.iter().zip(expected) {
            assert_eq!(rule.effect, effect);
            assert_eq!(rule.pattern, pattern);
        }
        assert_eq!(parse_rule("   "), Ok(None));
        assert_eq!(parse_rule("# only a comment"), Ok(None));
        assert_eq!(parse_rule(""), Ok(None));
        let pol = Policy::compile(rules);
        assert!(pol.allows(&id("spiffe://td/c")));
        assert!(!pol.allows(&id("spiffe://td/e")));
    }

    #[test]
    fn rule_display_round_trips() {
        for text in ["spiffe://td/a/*", "deny spiffe://td/**"] {
            let rule = parse_rule(text).unwrap().unwrap();
            assert_eq!(rule.to_string(), text);
            assert_eq!(parse_rule(&rule.to_string()).unwrap(), Some(rule));
        }
        let rule = parse_rule("allow spiffe://td/a").unwrap().unwrap();
        assert_eq!(rule.to_string(), "spiffe://td/a");
    }

    /// Asserts that `bad` on line 3 of a file is rejected with that location,
    /// the offending text, and a message containing `reason`.
    fn assert_bad_line(bad: &str, shown: &str, reason: &str) {
        let text = format!("# header\nspiffe://td/ok\n{bad}\nspiffe://td/after\n");
        let err = line_error(&text);
        assert_eq!(err.origin, "policy.txt", "{bad}");
        assert_eq!(err.line, 3, "{bad}: {err}");
        assert!(err.message.contains(shown), "{bad}: {err}");
        assert!(err.message.contains(reason), "{bad}: {err}");
        let display = err.to_string();
        assert!(display.starts_with("policy.txt:3: "), "{display}");
        // parse_rule alone gives the same reason.
        assert_eq!(parse_rule(bad), Err(err.message));
    }

    #[test]
    fn malformed_lines_are_located_and_explained() {
        assert_bad_line("https://td/web", "https://td/web", "spiffe://");
        assert_bad_line("SPIFFE://td/web", "SPIFFE://td/web", "spiffe://");
        assert_bad_line("web", "web", "spiffe://");
        assert_bad_line("spiffe://Example.org/web", "Example.org", "lower case");
        assert_bad_line("spiffe://td/web-*", "web-*", "whole path segment");
        assert_bad_line("spiffe://td/*web", "*web", "whole path segment");
        assert_bad_line("spiffe://td/a/***", "***", "whole path segment");
        assert_bad_line(
            "spiffe://td/**/web",
            "spiffe://td/**/web",
            "last path segment",
        );
        assert_bad_line(
            "spiffe://*.td/web",
            "spiffe://*.td/web",
            "trust domain must be literal",
        );
        assert_bad_line(
            "spiffe://*/web",
            "spiffe://*/web",
            "trust domain must be literal",
        );
        assert_bad_line(
            "spiffe://example.org",
            "spiffe://example.org",
            "spiffe://example.org/**",
        );
        assert_bad_line(
            "spiffe://example.org/",
            "spiffe://example.org/",
            "spiffe://example.org/**",
        );
        assert_bad_line("permit spiffe://td/web", "permit", "unknown keyword");
        assert_bad_line("DENY spiffe://td/web", "DENY", "lower case");
        assert_bad_line("deny", "deny", "needs a pattern");
        assert_bad_line("allow   # nothing", "allow", "needs a pattern");
        assert_bad_line("spiffe://td/ns/", "spiffe://td/ns/", "trailing `/`");
        assert_bad_line("spiffe://td/ns/*/", "spiffe://td/ns/*/**", "trailing `/`");
        assert_bad_line("spiffe://td/a//b", "spiffe://td/a//b", "empty path segment");
        assert_bad_line("spiffe://td//*", "spiffe://td//*", "empty path segment");
        assert_bad_line(
            "spiffe://td/a spiffe://td/b",
            "spiffe://td/a spiffe://td/b",
            "one pattern per line",
        );
        assert_bad_line(
            "deny spiffe://td/a spiffe://td/b",
            "spiffe://td/b",
            "one pattern per line",
        );
        assert_bad_line("spiffe://td/a/../b", "spiffe://td/a/../b", "dot segments");
        assert_bad_line(
            "spiffe://td/a?x=1",
            "spiffe://td/a?x=1",
            "invalid SPIFFE ID",
        );
        assert_bad_line("spiffe:///web", "spiffe:///web", "trust domain is missing");
    }

    #[test]
    fn first_malformed_line_is_reported() {
        let err = line_error("\n\nspiffe://td/a\n\nspiffe://td/x-*\nbogus line\n");
        assert_eq!(err.line, 5);
        assert!(err.message.contains("x-*"), "{err}");
        let err = line_error("spiffe://td\n");
        assert_eq!(err.line, 1);
    }

    #[test]
    fn length_limit_applies_to_the_pattern_as_written() {
        let prefix = "spiffe://td/";
        let max = spiffe_id::MAX_ID_LEN;
        let ok = format!("{prefix}{}/**", "a".repeat(max - prefix.len() - 3));
        assert_eq!(ok.len(), max);
        assert!(parse_rule(&ok).unwrap().is_some());
        let long = format!("{prefix}{}/**", "a".repeat(max - prefix.len() - 2));
        assert!(parse_rule(&long).unwrap_err().contains("2049"));
    }

    #[test]
    fn ten_thousand_patterns() {
        let mut rules = Vec::new();
        for i in 0..5_000 {
            rules.push(format!("spiffe://example.org/ns/team{i}/sa/svc{i}"));
        }
        for i in 0..2_000 {
            rules.push(format!("spiffe://example.org/ns/wild{i}/*"));
        }
        for i in 0..2_000 {
            rules.push(format!("spiffe://partner{i}.org/**"));
        }
        for i in 0..1_000 {
            rules.push(format!("spiffe://example.org/ns/*/sa/mid{i}"));
        }
        for i in (0..5_000).step_by(10) {
            rules.push(format!("deny spiffe://example.org/ns/team{i}/sa/svc{i}"));
        }
        let pol = policy(&rules.join("\n"));
        assert_eq!(pol.len(), 10_500);

        for i in 0..5_000 {
            let member = id(&format!("spiffe://example.org/ns/team{i}/sa/svc{i}"));
            assert_eq!(pol.allows(&member), i % 10 != 0, "team{i}");
            let other = id(&format!("spiffe://example.org/ns/team{i}/sa/svc{}", i + 1));
            assert!(!pol.allows(&other), "team{i} svc{}", i + 1);
        }
        for i in 0..2_000 {
            assert!(pol.allows(&id(&format!("spiffe://example.org/ns/wild{i}/x"))));
            assert!(!pol.allows(&id(&format!("spiffe://example.org/ns/wild{i}/x/y"))));
            assert!(!pol.allows(&id(&format!("spiffe://example.org/ns/wild{i}"))));
            assert!(pol.allows(&id(&format!("spiffe://partner{i}.org/a/b"))));
            assert!(!pol.allows(&id(&format!("spiffe://partner{i}.org"))));
            assert!(!pol.allows(&id(&format!("spiffe://partner{i}.org.evil/a"))));
        }
        for i in 0..1_000 {
            assert!(pol.allows(&id(&format!("spiffe://example.org/ns/any/sa/mid{i}"))));
            assert!(!pol.allows(&id(&format!(
                "spiffe://example.org/ns/any/sa/mid{}",
                i + 1_000
            ))));
        }
        assert!(!pol.allows(&id("spiffe://partner2000.org/a")));
        assert!(!pol.allows(&id("spiffe://example.org/ns/team1/sa")));
    }

    #[test]
    fn load_file_reads_and_locates_errors() {
        use std::io::Write;
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            file,
            "# test policy\nspiffe://td/web\ndeny spiffe://td/web/old"
        )
        .unwrap();
        let rules = load_file(file.path()).unwrap();
        assert_eq!(
            rules,
            vec![
                Rule {
                    effect: Effect::Allow,
                    pattern: "spiffe://td/web".into()
                },
                Rule {
                    effect: Effect::Deny,
                    pattern: "spiffe://td/web/old".into()
                },
            ]
        );

        let path = std::env::temp_dir().join(format!(
            "spiffe-tunnel-policy-test-{}-{:?}.txt",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, "spiffe://td/a\n\npermit spiffe://td/b\n").unwrap();
        let err = load_file(&path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(err.origin, path.display().to_string());
        assert_eq!(err.line, 3);
        assert!(err
            .to_string()
            .starts_with(&format!("{}:3: ", path.display())));
    }

    #[test]
    fn load_file_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.policy");
        let err = load_file(&path).unwrap_err();
        assert_eq!(err.origin, path.display().to_string());
        assert_eq!(err.line, 0);
        assert!(err.message.contains("cannot read"), "{err}");
        let io = std::fs::read_to_string(&path).unwrap_err().to_string();
        assert!(err.message.contains(&io), "{err}");
    }
}
