//! Fuzzing of every parser that reads hand-written or hostile input, as
//! property tests on stable Rust.
//!
//! Why not cargo-fuzz: libFuzzer needs nightly Rust, and nightly toolchains
//! cannot be installed on the machines this project builds on (rustup cannot
//! fetch them). So the targets are [`proptest`] properties instead: random
//! inputs *and* mutation-style inputs (valid seeds such as a real policy file,
//! config, DER chain, PROXY header or protobuf message, with bytes flipped,
//! inserted, deleted, duplicated and cut), each checked against a property
//! that is stronger than "does not panic" wherever one exists: a reference
//! implementation (SPIFFE ID grammar, policy matching), a round trip (policy
//! Display, PROXY v2 through an independent decoder) or a security invariant
//! (a mutated chain is never accepted, an accepted identity's keys match).
//!
//! Every target runs through [`fuzz`], which reads:
//!
//! - `PROPTEST_CASES=N`: cases per target (default: a CI-sized count per
//!   target; the whole file takes well under 30 s in a debug build);
//! - `FUZZ_SECONDS=S`: instead, run each target for S seconds, in batches
//!   (what `scripts/fuzz` does, in a release build);
//! - `FUZZ_SEED=N`: the seed of the first batch (default: random).
//!
//! Each target prints one line to stderr (see it with `--nocapture`):
//! `fuzz-summary target=NAME cases=N failures=F seconds=T seed=S accepted=A`
//! (A: inputs that got past validation, to show how deep a strategy
//! reaches). A failure
//! panics with the shrunk input and the seed and case count that reproduce
//! it. Failures are not persisted to files; a crash found becomes a named
//! regression test at the end of this file.

#[path = "common/certs.rs"]
mod certs;
#[path = "common/pp2.rs"]
mod pp2;

use std::collections::HashMap;
use std::fmt::{Debug, Write as _};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant, SystemTime};

use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::{
    Config as ProptestConfig, RngSeed, TestCaseError, TestError, TestRunner,
};
use prost::Message;
use rustls::SignatureScheme;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use certs::Ca;
use spiffe_tunnel::config::{Config, ConfigError, IdentityConfig};
use spiffe_tunnel::identity::workload_api::identity_from_response;
use spiffe_tunnel::identity::{BundleSet, Svid};
use spiffe_tunnel::policy::{self, Decision, Effect, Policy, Rule};
use spiffe_tunnel::proto::{X509svid, X509svidResponse};
use spiffe_tunnel::proxy::proxy_protocol::{ProxyHeader, MAX_VALUE_LEN};
use spiffe_tunnel::spiffe_id::{self, MAX_ID_LEN};
use spiffe_tunnel::tls::verify::{verify_svid_chain, PeerRole};

// ---- the harness -------------------------------------------------------------

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Runs `test` on inputs from `strategy`: `default_cases` of them, or
/// `PROPTEST_CASES`, or as many as fit in `FUZZ_SECONDS`.
/// `test` returns whether the input was accepted (parsed, verified): the
/// summary reports how many were, which shows whether the strategies reach
/// past the first validation step.
fn fuzz<S>(
    name: &str,
    default_cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<bool, TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    let seconds: Option<f64> = env("FUZZ_SECONDS");
    let cases: u32 = env("PROPTEST_CASES").unwrap_or(default_cases).max(1);
    let first_seed: u64 = env("FUZZ_SEED").unwrap_or_else(|| fastrand::u64(..));
    // In timed mode each batch is small enough to check the clock often.
    let batch = if seconds.is_some() {
        default_cases.clamp(16, 1000)
    } else {
        cases
    };
    let start = Instant::now();
    let deadline = seconds.map(|s| start + Duration::from_secs_f64(s.max(0.0)));
    let mut seed = first_seed;
    let mut run: u64 = 0;
    let accepted = AtomicU64::new(0);
    let counted = |value: S::Value| {
        if test(value)? {
            accepted.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    };
    loop {
        let config = ProptestConfig {
            cases: batch,
            failure_persistence: None,
            rng_seed: RngSeed::Fixed(seed),
            max_shrink_time: 60_000,
            ..ProptestConfig::default()
        };
        let mut runner = TestRunner::new(config);
        let result = runner.run(&strategy, counted);
        if let Err(error) = result {
            eprintln!(
                "fuzz-summary target={name} cases={run} failures=1 seconds={:.1} seed={first_seed}",
                start.elapsed().as_secs_f64()
            );
            let (kind, reason, input) = match error {
                TestError::Fail(reason, input) => ("failed", reason, format!("{input:#?}")),
                TestError::Abort(reason) => ("aborted", reason, String::new()),
            };
            panic!(
                "fuzz target {name} {kind}: {reason}\n\
                 reproduce with: FUZZ_SEED={seed} PROPTEST_CASES={batch} cargo test --test fuzz {name}\n\
                 minimal input: {input}"
            );
        }
        run += u64::from(batch);
        match deadline {
            Some(deadline) if Instant::now() < deadline => seed = splitmix(seed),
            _ => break,
        }
    }
    eprintln!(
        "fuzz-summary target={name} cases={run} failures=0 seconds={:.1} seed={first_seed} accepted={}",
        start.elapsed().as_secs_f64(),
        accepted.load(Ordering::Relaxed)
    );
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

// ---- mutations of a valid seed ---------------------------------------------

/// One edit of a byte string, positioned relative to its current length.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    /// Copies a chunk of the input to another place.
    Duplicate(Index, usize, Index),
    Truncate(Index),
    /// Inserts a dictionary token (syntax of the format being mutated).
    Token(Index, &'static [u8]),
}

fn mutation(dictionary: &'static [&'static [u8]]) -> BoxedStrategy<Mutation> {
    let token = if dictionary.is_empty() {
        Just(&b"\0"[..]).boxed()
    } else {
        select(dictionary).boxed()
    };
    prop_oneof![
        4 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        2 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        2 => (any::<Index>(), 1usize..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => (any::<Index>(), 1usize..64, any::<Index>())
            .prop_map(|(i, n, j)| Mutation::Duplicate(i, n, j)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        3 => (any::<Index>(), token).prop_map(|(i, t)| Mutation::Token(i, t)),
    ]
    .boxed()
}

fn apply(data: &mut Vec<u8>, mutation: &Mutation) {
    let len = data.len();
    // A position in 0..=len (for inserts) or 0..len (edits; none if empty).
    let at = |i: &Index| i.index(len + 1);
    let on = |i: &Index| (len > 0).then(|| i.index(len));
    match mutation {
        Mutation::FlipBit(i, bit) => {
            if let Some(p) = on(i) {
                data[p] ^= 1 << bit;
            }
        }
        Mutation::SetByte(i, b) => {
            if let Some(p) = on(i) {
                data[p] = *b;
            }
        }
        Mutation::Insert(i, bytes) => {
            let p = at(i);
            data.splice(p..p, bytes.iter().copied());
        }
        Mutation::Token(i, token) => {
            let p = at(i);
            data.splice(p..p, token.iter().copied());
        }
        Mutation::Delete(i, n) => {
            if let Some(p) = on(i) {
                data.drain(p..(p + n).min(len));
            }
        }
        Mutation::Duplicate(i, n, j) => {
            if let Some(p) = on(i) {
                let chunk = data[p..(p + n).min(len)].to_vec();
                let q = at(j);
                data.splice(q..q, chunk);
            }
        }
        Mutation::Truncate(i) => data.truncate(at(i)),
    }
}

/// `seed` with 1 to `max` mutations applied.
fn mutated(
    seed: Vec<u8>,
    max: usize,
    dictionary: &'static [&'static [u8]],
) -> impl Strategy<Value = Vec<u8>> + Clone {
    prop::collection::vec(mutation(dictionary), 1..=max).prop_map(move |edits| {
        let mut data = seed.clone();
        for edit in &edits {
            apply(&mut data, edit);
        }
        data
    })
}

/// Like [`mutated`], as text (invalid UTF-8 replaced).
fn mutated_text(
    seed: &str,
    max: usize,
    dictionary: &'static [&'static [u8]],
) -> impl Strategy<Value = String> + Clone {
    mutated(seed.as_bytes().to_vec(), max, dictionary)
        .prop_map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
}

/// Arbitrary text: any Unicode (control characters included) or any bytes.
fn any_text(max: usize) -> BoxedStrategy<String> {
    prop_oneof![
        prop::collection::vec(any::<char>(), 0..max).prop_map(String::from_iter),
        prop::collection::vec(any::<u8>(), 0..max)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
    .boxed()
}

/// Text made of `tokens`, which makes well-formed and near-miss input far
/// more likely than random characters do.
fn token_soup(tokens: &'static [&'static str], max: usize) -> BoxedStrategy<String> {
    prop::collection::vec(select(tokens), 0..max)
        .prop_map(|parts| parts.concat())
        .boxed()
}

// ---- 1. the policy parser ----------------------------------------------------

const POLICY_SEED: &str = "# who may call the api\n\
    spiffe://example.org/web             # exactly this ID\n\
    spiffe://example.org/ns/prod/*       # one more path segment\n\
    \tallow spiffe://example.org/ns/*/sa/web\n\
    spiffe://example.org/ns/prod/**\n\
    spiffe://partner.org/**\n\
    \n\
    deny spiffe://example.org/ns/prod/legacy\r\n\
    deny spiffe://example.org/ns/*/sa/old#comment\n";

const POLICY_TOKENS: &[&str] = &[
    "spiffe://",
    "spiffe://",
    "spiffe://",
    "example.org",
    "td",
    "a-b.c_d",
    "/",
    "/",
    "/",
    "//",
    "*",
    "**",
    "***",
    "web",
    "ns",
    "Web",
    "a.b",
    ".",
    "..",
    "...",
    "deny ",
    "allow ",
    "deny",
    "allow",
    "DENY ",
    "SPIFFE://",
    " ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    "\r",
    "#",
    "# c",
    "%2e",
    "?",
    ":",
    ":443",
    "@",
    "é",
    "\u{0}",
    "\u{b}",
    "\u{a0}",
    "\u{2028}",
    "-",
    "_",
    "A",
    "0",
];

const POLICY_DICTIONARY: &[&[u8]] = &[
    b"spiffe://",
    b"*",
    b"**",
    b"/",
    b"//",
    b"#",
    b"deny ",
    b"allow ",
    b"\n",
    b"\r",
    b" ",
    b"\t",
    b"..",
    b"%",
    b"\xc3\xa9",
    b"\xff",
    b"\0",
];

/// A policy line from a small grammar, so most lines parse and the round
/// trip and matching properties get exercised.
fn policy_line() -> impl Strategy<Value = String> {
    let effect = select(&["", "allow ", "deny ", "  deny\t", "allow\t"][..]);
    let td = select(&["td", "example.org", "b"][..]);
    let segments = prop::collection::vec(select(&["x", "y", "Web", "a.b", "*"][..]), 1..4);
    // Mostly valid endings, and the two classic mistakes now and then.
    let last = prop_oneof![
        8 => Just(""),
        4 => Just("/**"),
        1 => Just("/**/x"),
        1 => Just("/"),
    ];
    let comment = select(&["", " # note", "#x", "   "][..]);
    (effect, td, segments, last, comment).prop_map(|(effect, td, segments, last, comment)| {
        let mut line = format!("{effect}spiffe://{td}");
        for s in segments {
            line.push('/');
            line.push_str(s);
        }
        line.push_str(last);
        line.push_str(comment);
        line
    })
}

fn policy_text() -> BoxedStrategy<String> {
    prop_oneof![
        1 => any_text(200),
        2 => token_soup(POLICY_TOKENS, 40),
        2 => mutated_text(POLICY_SEED, 4, POLICY_DICTIONARY).boxed(),
        4 => prop::collection::vec(policy_line(), 0..6).prop_map(|l| l.join("\n")),
    ]
    .boxed()
}

/// The meaning of a pattern, written from docs/policy.md rather than from
/// `policy.rs`: the trust domain is literal, `*` is exactly one segment,
/// a final `**` one or more.
fn reference_matches(pattern: &str, id: &str) -> bool {
    fn split(s: &str) -> (&str, Vec<&str>) {
        let rest = s.strip_prefix("spiffe://").unwrap_or(s);
        match rest.split_once('/') {
            Some((td, path)) => (td, path.split('/').collect()),
            None => (rest, Vec::new()),
        }
    }
    fn walk(pattern: &[&str], id: &[&str]) -> bool {
        match (pattern, id) {
            ([], []) => true,
            (["**"], rest) => !rest.is_empty(),
            ([p, ptail @ ..], [s, stail @ ..]) => (*p == "*" || p == s) && walk(ptail, stail),
            _ => false,
        }
    }
    let (ptd, ppath) = split(pattern);
    let (itd, ipath) = split(id);
    ptd == itd && walk(&ppath, &ipath)
}

fn reference_decide<'a>(rules: &'a [Rule], id: &str) -> Decision<'a> {
    let first = |effect: Effect| {
        rules
            .iter()
            .find(|r| r.effect == effect && reference_matches(&r.pattern, id))
            .map(|r| r.pattern.as_str())
    };
    match (first(Effect::Deny), first(Effect::Allow)) {
        (Some(p), _) => Decision::Denied(p),
        (None, Some(p)) => Decision::Allowed(p),
        (None, None) => Decision::NoMatch,
    }
}

fn probe_id() -> impl Strategy<Value = String> {
    let td = select(&["td", "example.org", "b", "tdx"][..]);
    let segments = prop::collection::vec(select(&["x", "y", "Web", "a.b", "z"][..]), 0..5);
    (td, segments).prop_map(|(td, segments)| {
        let mut id = format!("spiffe://{td}");
        for s in segments {
            id.push('/');
            id.push_str(s);
        }
        id
    })
}

#[test]
fn fuzz_policy_parser() {
    let strategy = (policy_text(), prop::collection::vec(probe_id(), 0..6));
    fuzz("fuzz_policy_parser", 8000, strategy, |(text, probes)| {
        let Ok(rules) = policy::parse_rules(&text, "fuzz.policy") else {
            return Ok(false);
        };
        for rule in &rules {
            let shown = rule.to_string();
            prop_assert_eq!(policy::parse_rule(&shown), Ok(Some(rule.clone())));
            prop_assert!(rule.pattern.len() <= MAX_ID_LEN, "{}", rule.pattern);
            prop_assert!(
                !rule
                    .pattern
                    .contains(|c: char| c.is_whitespace() || c == '#'),
                "{:?}",
                rule.pattern
            );
        }
        let shown: Vec<String> = rules.iter().map(Rule::to_string).collect();
        let again = policy::parse_rules(&shown.join("\n"), "again");
        prop_assert_eq!(again.as_ref().ok(), Some(&rules), "{:?}", again);

        let compiled = Policy::compile(rules.clone());
        for probe in &probes {
            let id = spiffe_id::parse(probe).expect("probe IDs are valid");
            prop_assert_eq!(
                compiled.decide(&id),
                reference_decide(&rules, probe),
                "{} against {:?}",
                probe,
                shown
            );
        }
        Ok(!rules.is_empty())
    });
}

// ---- 2. the config parser ----------------------------------------------------

const CONFIG_SEED_WORKLOAD_API: &str = r#"[identity]
source = "workload_api"                 # or "files"
socket = "unix:///tmp/spire-agent/public/api.sock"
startup_timeout = "30s"

[admin]
listen = "127.0.0.1:9901"

[log]
filter = "spiffe_tunnel=debug,info"

[defaults]
handshake_timeout = "10s"
connect_timeout = "5s"
idle_timeout = "1h"
max_connections = 10000
drain_timeout = "30s"

[[inbound]]
name = "api"
listen = "0.0.0.0:8443"
target = "127.0.0.1:3000"
allow = ["spiffe://example.org/web", "deny spiffe://example.org/web/old"]
policy = "policies/api.policy"
svid = "spiffe://example.org/api"
proxy_protocol = true
access_log = true
min_tls = "1.2"

[[outbound]]
name = "api"
listen = "127.0.0.1:8080"
upstreams = ["10.0.0.2:8443", "[2001:db8::3]:8443", "api.example.org:8443"]
allow = ["spiffe://example.org/api"]
balance = "round_robin"
resolve_interval = "10s"
health_check_interval = "2s"
idle_timeout = "5m"
"#;

const CONFIG_SEED_FILES: &str = r#"[identity]
source = "files"
cert = "certs/api.pem"
key = "/etc/certs/api.key"
[identity.bundles]
"example.org" = "certs/bundle.pem"
"partner.org" = 'certs/partner.pem'

[[inbound]]
name = "in-1"
listen = "[::]:8443"
target = "unix:/run/app.sock"
policy = "api.policy"
"#;

const CONFIG_DICTIONARY: &[&[u8]] = &[
    b"[identity]\n",
    b"[[inbound]]\n",
    b"[[outbound]]\n",
    b"[defaults]\n",
    b"[admin]\n",
    b"[log]\n",
    b"[identity.bundles]\n",
    b" = ",
    b"\"",
    b"'",
    b"'''",
    b"\"\"\"",
    b"[",
    b"]",
    b"{",
    b"}",
    b",",
    b".",
    b"\n",
    b"#",
    b"\\",
    b"\\u0000",
    b"1",
    b"-1",
    b"0",
    b"9223372036854775807",
    b"1e400",
    b"nan",
    b"inf",
    b"true",
    b"1979-05-27T07:32:00Z",
    b"\"0s\"",
    b"\"300000000000y\"",
    b"unix:",
    b"spiffe://",
    b"[::]",
    b":0",
];

const CONFIG_TOKENS: &[&str] = &[
    "[identity]\n",
    "[[inbound]]\n",
    "[[outbound]]\n",
    "[defaults]\n",
    "[admin]\n",
    "[log]\n",
    "[identity.bundles]\n",
    "source = \"workload_api\"\n",
    "source = \"files\"\n",
    "name = ",
    "listen = ",
    "target = ",
    "allow = ",
    "upstreams = ",
    "policy = ",
    "socket = ",
    "cert = ",
    "key = ",
    "\"api\"",
    "\"127.0.0.1:8443\"",
    "\"[::1]:1\"",
    "[\"spiffe://td/x\"]",
    "\"10s\"",
    "10",
    "-1",
    "= ",
    "\"",
    "'",
    "[",
    "]",
    "{",
    "}",
    ",",
    "\n",
    "#",
    " ",
    "=",
    "a",
    "é",
    "\\",
];

/// A config value: the raw TOML that goes after `key = `.
#[derive(Clone, Copy)]
enum Kind {
    Duration,
    Int,
    Bool,
    Listen,
    HostPort,
    Target,
    Pattern,
    Id,
    Name,
    Source,
    Socket,
    Path,
    Balance,
    MinTls,
    LogFilter,
}

fn hostile_values(kind: Kind) -> Vec<String> {
    let strings: &[&str] = match kind {
        Kind::Duration => &[
            "0s",
            "0ns",
            "1ns",
            "1s",
            "30s",
            "1h",
            "10000000000y",
            "300000000000y",
            "584542046090y",
            "18446744073709551615s",
            "18446744073709551616s",
            "1e3s",
            "-1s",
            "",
            "10",
            " 1s",
            "1 s",
            "1h30m",
            "2 days",
            "99999999999999999999999ns",
            "1μs",
            "P1D",
        ],
        Kind::Int | Kind::Bool => &[],
        Kind::Listen => &[
            "0.0.0.0:0",
            "127.0.0.1:8443",
            "[::]:443",
            "[::1]:0",
            "127.0.0.1:65536",
            "localhost:80",
            "[fe80::1%eth0]:1",
            ":80",
            "1.2.3.4",
            "[::1]",
            "unix:/x",
            "0:0",
            "[::ffff:1.2.3.4]:5",
            "256.0.0.1:1",
            "",
        ],
        Kind::HostPort | Kind::Target => &[
            "10.0.0.2:8443",
            "example.org:443",
            "[::1]:1",
            "host:0",
            "host:65536",
            ":1",
            "[:1",
            "a:b:c",
            "[::1]:",
            "é.org:80",
            "unix:",
            "unix:/run/app.sock",
            "unix:relative",
            "unix:\u{0}",
            "[::1]:-1",
            "host:+1",
            "",
        ],
        Kind::Pattern | Kind::Id => &[
            "spiffe://example.org/web",
            "spiffe://example.org/ns/*",
            "spiffe://td/**",
            "deny spiffe://td/x",
            "spiffe://Example.org/a",
            "spiffe://td/",
            "#",
            "",
            "allow",
            "spiffe://td/a b",
            "spiffe://td",
            "spiffe://td/a/../b",
            "SPIFFE://td/a",
        ],
        Kind::Name => &["api", "", "a.b-c_d", "é", "a b", "\u{0}", "-", "..", "api"],
        Kind::Source => &["workload_api", "files", "WORKLOAD_API", "", "spire"],
        Kind::Socket => &[
            "unix:///tmp/a.sock",
            "unix:/a",
            "unix:rel",
            "tcp://127.0.0.1:1",
            "tcp://localhost:1",
            "http://x",
            "",
            "unix://",
            "tcp://[::1]:0",
        ],
        Kind::Path => &[
            "svid.pem",
            "/abs/x",
            "../../etc/passwd",
            "",
            "\u{0}",
            "a\\b",
            "~/x",
        ],
        Kind::Balance => &["p2c", "round_robin", "random", "", "P2C"],
        Kind::MinTls => &["1.3", "1.2", "1.1", "1.0", "TLSv1.3", "", "1.30"],
        Kind::LogFilter => &[
            "info",
            "spiffe_tunnel=debug,info",
            "[{a=}]",
            "a[b",
            "=",
            "off",
            ",,,",
            "foo[bar{baz=1}]=trace",
            "x=info[",
            "t[s{f=\"v\"}]=debug",
            "[]",
            "{",
            "/",
            "=info=",
            "a=b=c",
            "[s{f=/(a*)*b/}]=debug",
        ],
    };
    let mut values: Vec<String> = strings.iter().map(|s| toml_string(s)).collect();
    match kind {
        Kind::Int => values.extend(
            [
                "0",
                "-1",
                "1",
                "9223372036854775807",
                "-9223372036854775808",
                "1.5",
                "\"10\"",
                "1e3",
                "0x10",
                "true",
                "inf",
                "nan",
                "1_000",
            ]
            .map(String::from),
        ),
        Kind::Bool => values.extend(["true", "false", "1", "\"true\""].map(String::from)),
        Kind::Name => values.extend([toml_string(&"n".repeat(64)), toml_string(&"n".repeat(65))]),
        Kind::HostPort => values.push(toml_string(&format!("{}:1", "h".repeat(300)))),
        Kind::Pattern | Kind::Id => {
            values.push(toml_string(&format!("spiffe://td/{}", "a".repeat(2036))));
            values.push(toml_string(&format!("spiffe://td/{}", "a".repeat(2037))));
        }
        Kind::LogFilter => values.push(toml_string(&"a[".repeat(2000))),
        _ => {}
    }
    // Values of the wrong TOML type.
    values.extend(["[]", "{}", "1", "\"\""].map(String::from));
    values
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One line of a config template: a table header, or a key with its valid
/// value and the kind of hostile values that may replace it.
enum Line {
    Header(&'static str),
    Key(&'static str, &'static str, Kind),
    List(&'static str, &'static [&'static str], Kind),
}

const TEMPLATE_WORKLOAD_API: &[Line] = &[
    Line::Header("[identity]"),
    Line::Key("source", "\"workload_api\"", Kind::Source),
    Line::Key("socket", "\"unix:///tmp/api.sock\"", Kind::Socket),
    Line::Key("startup_timeout", "\"30s\"", Kind::Duration),
    Line::Header("[admin]"),
    Line::Key("listen", "\"127.0.0.1:9901\"", Kind::Listen),
    Line::Header("[log]"),
    Line::Key("filter", "\"info\"", Kind::LogFilter),
    Line::Header("[defaults]"),
    Line::Key("handshake_timeout", "\"10s\"", Kind::Duration),
    Line::Key("connect_timeout", "\"5s\"", Kind::Duration),
    Line::Key("idle_timeout", "\"1h\"", Kind::Duration),
    Line::Key("max_connections", "100", Kind::Int),
    Line::Key("drain_timeout", "\"30s\"", Kind::Duration),
    Line::Key("min_tls", "\"1.3\"", Kind::MinTls),
    Line::Header("[[inbound]]"),
    Line::Key("name", "\"api\"", Kind::Name),
    Line::Key("listen", "\"0.0.0.0:8443\"", Kind::Listen),
    Line::Key("target", "\"127.0.0.1:3000\"", Kind::Target),
    Line::List(
        "allow",
        &["spiffe://example.org/web", "deny spiffe://example.org/x"],
        Kind::Pattern,
    ),
    Line::Key("svid", "\"spiffe://example.org/api\"", Kind::Id),
    Line::Key("proxy_protocol", "true", Kind::Bool),
    Line::Key("access_log", "false", Kind::Bool),
    Line::Key("idle_timeout", "\"10m\"", Kind::Duration),
    Line::Key("max_connections", "5", Kind::Int),
    Line::Header("[[outbound]]"),
    Line::Key("name", "\"api\"", Kind::Name),
    Line::Key("listen", "\"127.0.0.1:8080\"", Kind::Listen),
    Line::List(
        "upstreams",
        &["10.0.0.2:8443", "api.example.org:8443"],
        Kind::HostPort,
    ),
    Line::List("allow", &["spiffe://example.org/api"], Kind::Pattern),
    Line::Key("balance", "\"p2c\"", Kind::Balance),
    Line::Key("resolve_interval", "\"30s\"", Kind::Duration),
    Line::Key("health_check_interval", "\"2s\"", Kind::Duration),
    Line::Key("connect_timeout", "\"1s\"", Kind::Duration),
    Line::Key("drain_timeout", "\"0s\"", Kind::Duration),
];

const TEMPLATE_FILES: &[Line] = &[
    Line::Header("[identity]"),
    Line::Key("source", "\"files\"", Kind::Source),
    Line::Key("cert", "\"certs/svid.pem\"", Kind::Path),
    Line::Key("key", "\"certs/svid.key\"", Kind::Path),
    Line::Header("[identity.bundles]"),
    Line::Key("\"example.org\"", "\"certs/bundle.pem\"", Kind::Path),
    Line::Key("\"partner.org\"", "\"certs/partner.pem\"", Kind::Path),
    Line::Header("[[inbound]]"),
    Line::Key("name", "\"in\"", Kind::Name),
    Line::Key("listen", "\"[::1]:8443\"", Kind::Listen),
    Line::Key("target", "\"unix:/run/app.sock\"", Kind::Target),
    Line::Key("policy", "\"api.policy\"", Kind::Path),
    Line::Key("handshake_timeout", "\"2s\"", Kind::Duration),
];

/// One line of a template as written (valid), and a strategy for what may
/// replace it: a hostile value, arbitrary text, or nothing (`None`: the line
/// is left out).
fn template_line(line: &Line) -> (String, BoxedStrategy<Option<String>>) {
    let (key, valid, kind) = match line {
        Line::Header(h) => {
            // A table header goes missing or comes twice.
            let twice = format!("{h}\n{h}");
            return (
                (*h).to_string(),
                prop_oneof![Just(None), Just(Some(twice))].boxed(),
            );
        }
        Line::Key(key, valid, kind) => (*key, (*valid).to_string(), *kind),
        Line::List(key, items, kind) => {
            let items: Vec<String> = items.iter().map(|s| toml_string(s)).collect();
            (*key, format!("[{}]", items.join(", ")), *kind)
        }
    };
    let list = matches!(line, Line::List(..));
    let hostile = select(hostile_values(kind)).prop_flat_map(move |v| {
        if list {
            // A list with the hostile value, alone or twice, or not a list.
            prop_oneof![
                Just(format!("[{v}]")),
                Just(v.clone()),
                Just(format!("[{v}, {v}]"))
            ]
            .boxed()
        } else {
            Just(v).boxed()
        }
    });
    let replacement = prop_oneof![
        6 => hostile.prop_map(move |value| Some(format!("{key} = {value}"))),
        1 => any_text(20).prop_map(move |t| Some(format!("{key} = {}", toml_string(&t)))),
        1 => Just(None),
    ]
    .boxed();
    (format!("{key} = {valid}"), replacement)
}

/// A valid config from a template with up to three lines replaced by
/// hostile ones, so that most inputs get past TOML and reach validation,
/// and a quarter of them are valid throughout.
fn templated_config() -> BoxedStrategy<String> {
    prop::bool::ANY
        .prop_flat_map(|files| {
            let template = if files {
                TEMPLATE_FILES
            } else {
                TEMPLATE_WORKLOAD_API
            };
            let (valid, replacements): (Vec<String>, Vec<_>) =
                template.iter().map(template_line).unzip();
            (
                Just(valid),
                replacements,
                prop::collection::vec(any::<Index>(), 0..4),
            )
        })
        .prop_map(|(valid, replacements, picks)| {
            let picked: Vec<usize> = picks.iter().map(|i| i.index(valid.len())).collect();
            let mut text = String::new();
            for (n, (line, replacement)) in valid.iter().zip(&replacements).enumerate() {
                let line = if picked.contains(&n) {
                    replacement.as_ref()
                } else {
                    Some(line)
                };
                if let Some(line) = line {
                    text.push_str(line);
                    text.push('\n');
                }
            }
            text
        })
        .boxed()
}

fn config_text() -> BoxedStrategy<String> {
    prop_oneof![
        1 => any_text(300),
        1 => token_soup(CONFIG_TOKENS, 60),
        2 => mutated_text(CONFIG_SEED_WORKLOAD_API, 8, CONFIG_DICTIONARY).boxed(),
        1 => mutated_text(CONFIG_SEED_FILES, 8, CONFIG_DICTIONARY).boxed(),
        4 => templated_config(),
    ]
    .boxed()
}

/// Every duration a config holds, by key.
fn durations(config: &Config) -> Vec<(String, Duration)> {
    let mut out = Vec::new();
    if let IdentityConfig::WorkloadApi {
        startup_timeout, ..
    } = &config.identity
    {
        out.push(("identity.startup_timeout".to_string(), *startup_timeout));
    }
    let settings = config
        .inbound
        .iter()
        .map(|t| (&t.name, &t.settings))
        .chain(config.outbound.iter().map(|t| (&t.name, &t.settings)));
    for (name, s) in settings {
        for (key, d) in [
            ("handshake_timeout", s.handshake_timeout),
            ("connect_timeout", s.connect_timeout),
            ("idle_timeout", s.idle_timeout),
            ("drain_timeout", s.drain_timeout),
        ] {
            out.push((format!("{name}.{key}"), d));
        }
    }
    for t in &config.outbound {
        out.push((
            format!("{}.resolve_interval", t.name),
            t.balance.resolve_interval,
        ));
        if let Some(d) = t.balance.health_check_interval {
            out.push((format!("{}.health_check_interval", t.name), d));
        }
    }
    out
}

/// The properties of one config text: no panic, located errors, and an
/// accepted config that can run.
fn check_config(text: &str) -> Result<bool, TestCaseError> {
    let path = Path::new("/nonexistent/spiffe-tunnel-fuzz/tunnel.toml");
    match Config::parse(text, path) {
        Err(ConfigError::Invalid { file, line, .. }) => {
            prop_assert_eq!(file, path.display().to_string());
            prop_assert!(
                line >= 1 && line <= text.matches('\n').count() + 1,
                "line {}",
                line
            );
            Ok(false)
        }
        Err(ConfigError::Policy(_) | ConfigError::Read { .. }) => Ok(false),
        Ok(config) => {
            prop_assert!(!config.inbound.is_empty() || !config.outbound.is_empty());
            for t in &config.inbound {
                prop_assert!(t.settings.max_connections >= 1);
                prop_assert!(!t.policy.inline.is_empty() || t.policy.file.is_some());
            }
            for t in &config.outbound {
                prop_assert!(t.settings.max_connections >= 1);
                prop_assert!(!t.upstreams.is_empty());
            }
            // "A Config that exists is one that can run": the data path
            // computes deadlines as `Instant::now() + duration`, which panics
            // when the sum does not fit.
            let now = Instant::now();
            for (key, d) in durations(&config) {
                prop_assert!(
                    now.checked_add(d).is_some(),
                    "{} = {:?} was accepted but `Instant::now() + {:?}` overflows",
                    key,
                    d,
                    d
                );
            }
            Ok(true)
        }
    }
}

#[test]
fn fuzz_config_parser() {
    fuzz("fuzz_config_parser", 4000, config_text(), |text| {
        check_config(&text)
    });
}

// ---- 3. the SPIFFE ID parser -------------------------------------------------

/// The SPIFFE-ID spec's grammar (SPIFFE-ID.md, sections 2 and 2.3), as
/// simply as it can be written: `spiffe://` in lower case, a trust domain of
/// `[a-z0-9._-]+`, then zero or more `/segment` with segments of
/// `[a-zA-Z0-9._-]+` other than `.` and `..`; 2048 bytes at most. Returns
/// (trust domain, path).
fn reference_parse(s: &str) -> Option<(&str, &str)> {
    if s.len() > MAX_ID_LEN {
        return None;
    }
    let rest = s.strip_prefix("spiffe://")?;
    let (td, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let td_ok = !td.is_empty()
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if !td_ok {
        return None;
    }
    if !path.is_empty() {
        for segment in path[1..].split('/') {
            let ok = !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return None;
            }
        }
    }
    Some((td, path))
}

fn valid_id() -> impl Strategy<Value = String> {
    let td = "[a-z0-9._-]{1,12}";
    let segments = prop::collection::vec("[a-zA-Z0-9._-]{1,8}", 0..5);
    (td, segments).prop_map(|(td, segments)| {
        let mut id = format!("spiffe://{td}");
        for s in segments {
            id.push('/');
            id.push_str(&s);
        }
        id
    })
}

/// IDs around the 2048-byte limit.
fn long_id() -> impl Strategy<Value = String> {
    (
        MAX_ID_LEN - 20..MAX_ID_LEN + 20,
        select(&["a", "a/", "A.", "-_"][..]),
    )
        .prop_map(|(len, unit)| {
            let mut id = String::from("spiffe://example.org/");
            while id.len() < len {
                id.push_str(unit);
            }
            id.truncate(len);
            id
        })
}

const ID_DICTIONARY: &[&[u8]] = &[
    b"/",
    b"//",
    b".",
    b"..",
    b"/./",
    b"/../",
    b"%2e",
    b"%",
    b"spiffe://",
    b"SPIFFE",
    b":",
    b":443",
    b"@",
    b"?",
    b"#",
    b"A",
    b"\xc3\xa9",
    b" ",
    b"\0",
    b"*",
    b"+",
    b"~",
];

fn id_text() -> BoxedStrategy<String> {
    prop_oneof![
        1 => any_text(60),
        2 => "spiffe://[a-zA-Z0-9._/%:@?#~+é \\-]{0,40}",
        2 => valid_id().boxed(),
        3 => valid_id().prop_flat_map(|id| mutated_text(&id, 3, ID_DICTIONARY)),
        1 => long_id().boxed(),
    ]
    .boxed()
}

#[test]
fn fuzz_spiffe_id_parser() {
    fuzz("fuzz_spiffe_id_parser", 15000, id_text(), |s| {
        let parsed = spiffe_id::parse(&s);
        let reference = reference_parse(&s);
        prop_assert_eq!(
            parsed.is_ok(),
            reference.is_some(),
            "parser says {:?}, the spec grammar says {:?}",
            parsed,
            reference
        );
        if let (Ok(id), Some((td, path))) = (&parsed, reference) {
            prop_assert_eq!(id.to_string(), s.clone(), "not canonical");
            prop_assert!(s.len() <= MAX_ID_LEN);
            prop_assert_eq!(id.trust_domain().as_str(), td);
            prop_assert_eq!(id.path(), path);
            prop_assert!(spiffe_id::parse_trust_domain(td).is_ok(), "{}", td);
        }
        let workload = spiffe_id::parse_workload_id(&s);
        prop_assert_eq!(
            workload.is_ok(),
            reference.is_some_and(|(_, p)| !p.is_empty())
        );
        // A trust domain name alone.
        if let Some(name) = s.strip_prefix("spiffe://") {
            let td = spiffe_id::parse_trust_domain(name);
            let expected = reference_parse(&s).is_some_and(|(_, p)| p.is_empty());
            prop_assert_eq!(td.is_ok(), expected, "{:?}: {:?}", name, td);
        }
        Ok(parsed.is_ok())
    });
}

// ---- 4. the verifier, on mutated DER chains --------------------------------

struct Chains {
    /// Leaf signed by an intermediate, then the intermediate.
    deep: Vec<CertificateDer<'static>>,
    /// Leaf signed by the root.
    flat: Vec<CertificateDer<'static>>,
    /// Every certificate a chain may legitimately carry: the genuine
    /// leaves and the genuine CA certificates.
    known: Vec<CertificateDer<'static>>,
    leaves: Vec<CertificateDer<'static>>,
    signers: Vec<CertificateDer<'static>>,
    bundles: BundleSet,
    now: UnixTime,
}

static CHAINS: LazyLock<Chains> = LazyLock::new(|| {
    let ca = Ca::new("example.org");
    let mid = ca.intermediate();
    let deep = mid.leaf("spiffe://example.org/ns/prod/web").chain_der;
    let flat = ca.leaf("spiffe://example.org/api").chain_der;
    let leaves = vec![deep[0].clone(), flat[0].clone()];
    let signers = vec![mid.cert_der().clone(), ca.root_der().clone()];
    let known = leaves.iter().chain(&signers).cloned().collect();
    let chains = Chains {
        deep,
        flat,
        known,
        leaves,
        signers,
        bundles: ca.bundle_set(),
        now: UnixTime::now(),
    };
    for chain in [&chains.deep, &chains.flat] {
        verify_svid_chain(chain, &chains.bundles, chains.now, PeerRole::Any)
            .expect("the unmutated chains verify");
    }
    chains
});

const DER_DICTIONARY: &[&[u8]] = &[
    b"\x30\x82",
    b"\x30\x80",
    b"\x00",
    b"\xff",
    b"\x80",
    b"\x81\xff",
    b"\x84\xff\xff\xff\xff",
    b"\x05\x00",
    b"\x01\x01\xff",
    b"\x06\x03\x55\x1d\x11",
    b"\x06\x03\x55\x1d\x13",
    b"\x06\x03\x55\x1d\x0f",
    b"\x86\x18spiffe://example.org/web",
    b"\x03\x02\x01\x06",
];

/// Structural edits of a chain, beyond byte mutations of its certificates.
#[derive(Debug, Clone)]
enum ChainEdit {
    /// Byte mutations of the certificate at this index.
    Mutate(Index, Vec<Mutation>),
    Drop(Index),
    Duplicate(Index),
    Swap(Index, Index),
    /// Appends a known good certificate (the root, the other chain's).
    AppendKnown(Index),
}

fn role() -> impl Strategy<Value = PeerRole> {
    select(&[PeerRole::Client, PeerRole::Server, PeerRole::Any][..])
}

fn byte_mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(DER_DICTIONARY), 1..4)
}

#[test]
fn fuzz_verifier_mutated_certificates() {
    // Only the bytes of the certificates change; the chain is accepted only
    // if it is byte-identical to the original (a mutation that cancels
    // itself out, like flipping one bit twice).
    let strategy = (
        prop::bool::ANY,
        prop::collection::vec((any::<Index>(), byte_mutations()), 1..3),
        role(),
    );
    fuzz(
        "fuzz_verifier_mutated_certificates",
        4000,
        strategy,
        |(deep, edits, role)| {
            let chains = &*CHAINS;
            let original = if deep { &chains.deep } else { &chains.flat };
            let mut chain: Vec<Vec<u8>> = original.iter().map(|c| c.to_vec()).collect();
            for (which, mutations) in &edits {
                let n = which.index(chain.len());
                for m in mutations {
                    apply(&mut chain[n], m);
                }
            }
            let chain: Vec<CertificateDer<'static>> =
                chain.into_iter().map(CertificateDer::from).collect();
            let result = verify_svid_chain(&chain, &chains.bundles, chains.now, role);
            if let Ok(peer) = &result {
                prop_assert_eq!(
                    &chain,
                    original,
                    "a mutated chain was accepted as {}",
                    peer.id
                );
            }
            Ok(result.is_ok())
        },
    );
}

#[test]
fn fuzz_verifier_chain_edits() {
    // Chains reordered, shortened, padded and mutated: whatever is accepted
    // has a genuine leaf first and, for the leaf of the intermediate, the
    // genuine intermediate after it. Extra certificates a path does not use
    // are ignored (as webpki does, and TLS peers do send them), even
    // corrupted ones, as long as they still pass the X509-SVID signer rules.
    let edit = prop_oneof![
        3 => (any::<Index>(), byte_mutations()).prop_map(|(i, m)| ChainEdit::Mutate(i, m)),
        1 => any::<Index>().prop_map(ChainEdit::Drop),
        1 => any::<Index>().prop_map(ChainEdit::Duplicate),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| ChainEdit::Swap(a, b)),
        1 => any::<Index>().prop_map(ChainEdit::AppendKnown),
    ];
    let strategy = (prop::bool::ANY, prop::collection::vec(edit, 1..4), role());
    fuzz(
        "fuzz_verifier_chain_edits",
        4000,
        strategy,
        |(deep, edits, role)| {
            let chains = &*CHAINS;
            let original = if deep { &chains.deep } else { &chains.flat };
            let mut chain: Vec<Vec<u8>> = original.iter().map(|c| c.to_vec()).collect();
            for edit in &edits {
                let len = chain.len();
                match edit {
                    ChainEdit::Mutate(i, mutations) if len > 0 => {
                        let n = i.index(len);
                        for m in mutations {
                            apply(&mut chain[n], m);
                        }
                    }
                    ChainEdit::Drop(i) if len > 0 => {
                        chain.remove(i.index(len));
                    }
                    ChainEdit::Duplicate(i) if len > 0 => {
                        let n = i.index(len);
                        chain.insert(n, chain[n].clone());
                    }
                    ChainEdit::Swap(a, b) if len > 0 => chain.swap(a.index(len), b.index(len)),
                    ChainEdit::AppendKnown(i) => {
                        chain.push(chains.known[i.index(chains.known.len())].to_vec());
                    }
                    _ => {}
                }
            }
            let chain: Vec<CertificateDer<'static>> =
                chain.into_iter().map(CertificateDer::from).collect();
            let result = verify_svid_chain(&chain, &chains.bundles, chains.now, role);
            if let Ok(peer) = &result {
                prop_assert!(
                    chains.leaves.contains(&chain[0]),
                    "a leaf the CA never issued was accepted as {}",
                    peer.id
                );
                // The deep leaf chains only through the genuine intermediate.
                if chain[0] == chains.deep[0] {
                    prop_assert!(
                    chain[1..].contains(&chains.signers[0]),
                    "the intermediate's leaf was accepted without the genuine intermediate ({})",
                    peer.id
                );
                }
            }
            Ok(result.is_ok())
        },
    );
}

// ---- 5. the PROXY v2 encoder, through an independent decoder -----------------

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        any::<SocketAddr>(),
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::from((IpAddr::from(ip), port))),
        // IPv4-mapped IPv6, which must stay IPv6 on the wire.
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| {
            SocketAddr::from((std::net::Ipv4Addr::from(ip).to_ipv6_mapped(), port))
        }),
    ]
}

/// Text from empty to a little over the longest value a TLV may carry.
fn tlv_text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => any_text(80),
        1 => (MAX_VALUE_LEN - 3..MAX_VALUE_LEN + 3, select(&["a", "é", "\u{10348}"][..]))
            .prop_map(|(len, unit)| {
                let mut s = String::new();
                while s.len() + unit.len() <= len {
                    s.push_str(unit);
                }
                s
            }),
        1 => (0usize..70_000).prop_map(|n| "x".repeat(n)),
    ]
    .boxed()
}

fn mapped(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[test]
fn fuzz_proxy_v2_round_trip() {
    let strategy = (
        socket_addr(),
        socket_addr(),
        tlv_text(),
        prop::option::of(tlv_text()),
        tlv_text(),
        prop::collection::vec(any::<u8>(), 0..32),
    );
    fuzz(
        "fuzz_proxy_v2_round_trip",
        2500,
        strategy,
        |(source, destination, version, cipher, id, payload)| {
            let header = ProxyHeader {
                source,
                destination,
                tls_version: &version,
                cipher: cipher.as_deref(),
                spiffe_id: &id,
            };
            let encoded = header.encode();
            let mut stream = encoded.clone();
            stream.extend_from_slice(&payload);
            let decoded = pp2::decode(&stream)
                .map_err(|e| TestCaseError::fail(format!("decoder refused the header: {e:?}")))?;
            prop_assert_eq!(decoded.consumed, encoded.len());
            prop_assert_eq!(&stream[decoded.consumed..], &payload[..]);
            prop_assert_eq!(decoded.command, pp2::Command::Proxy);
            prop_assert_eq!(decoded.transport, pp2::Transport::Stream);
            let (src, dst) = (decoded.source.unwrap(), decoded.destination.unwrap());
            if source.is_ipv4() && destination.is_ipv4() {
                prop_assert_eq!(decoded.family, pp2::Family::Inet);
                prop_assert_eq!((src.ip(), dst.ip()), (source.ip(), destination.ip()));
            } else {
                prop_assert_eq!(decoded.family, pp2::Family::Inet6);
                prop_assert_eq!(src.ip(), IpAddr::V6(mapped(source.ip())));
                prop_assert_eq!(dst.ip(), IpAddr::V6(mapped(destination.ip())));
            }
            prop_assert_eq!(
                (src.port(), dst.port()),
                (source.port(), destination.port())
            );

            fn fits(s: &str) -> Option<&[u8]> {
                (s.len() <= MAX_VALUE_LEN).then_some(s.as_bytes())
            }
            let ssl = decoded.ssl.as_ref().expect("PP2_TYPE_SSL");
            prop_assert_eq!(ssl.client, 0x03);
            prop_assert_eq!(ssl.verify, 0);
            prop_assert_eq!(decoded.ssl_sub(0x21), fits(&version));
            prop_assert_eq!(decoded.ssl_sub(0x23), cipher.as_deref().and_then(fits));
            let sub_kinds: Vec<u8> = ssl.subs.iter().map(|(k, _)| *k).collect();
            let expected_subs: Vec<u8> = [
                (0x21, fits(&version).is_some()),
                (0x23, cipher.as_deref().and_then(fits).is_some()),
            ]
            .iter()
            .filter(|(_, present)| *present)
            .map(|(k, _)| *k)
            .collect();
            prop_assert_eq!(sub_kinds, expected_subs);
            prop_assert_eq!(decoded.tlv(0xE0), fits(&id));
            let kinds: Vec<u8> = decoded.tlvs.iter().map(|(k, _)| *k).collect();
            let expected: Vec<u8> = if fits(&id).is_some() {
                vec![0x20, 0xE0]
            } else {
                vec![0x20]
            };
            prop_assert_eq!(kinds, expected);

            // Every cut of the header is refused, never misread.
            for cut in [0, 1, 15, 16, encoded.len() / 2, encoded.len() - 1] {
                prop_assert!(pp2::decode(&encoded[..cut]).is_err(), "cut at {}", cut);
            }
            Ok(true)
        },
    );
}

// ---- 6. Workload API responses, on mutated protobuf ------------------------

struct ApiFixture {
    response: X509svidResponse,
    /// The leaf certificates of the valid response.
    leaves: Vec<CertificateDer<'static>>,
    /// Valid values to swap between fields.
    keys: Vec<Vec<u8>>,
    ders: Vec<Vec<u8>>,
    now: SystemTime,
}

fn key_der(pem: &str) -> Vec<u8> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .expect("PKCS#8 PEM")
        .secret_der()
        .to_vec()
}

static API: LazyLock<ApiFixture> = LazyLock::new(|| {
    let ca = Ca::new("example.org");
    let mid = ca.intermediate();
    let partner = Ca::new("partner.org");
    let web = mid.leaf("spiffe://example.org/web");
    let api = ca.leaf("spiffe://example.org/api");
    let concat = |certs: &[CertificateDer<'static>]| {
        certs.iter().flat_map(|c| c.to_vec()).collect::<Vec<u8>>()
    };
    let bundle = ca.root_der().to_vec();
    let svid = |leaf: &certs::Leaf, hint: &str| X509svid {
        spiffe_id: leaf.id.clone(),
        x509_svid: concat(&leaf.chain_der),
        x509_svid_key: key_der(&leaf.key_pem),
        bundle: bundle.clone(),
        hint: hint.into(),
    };
    let response = X509svidResponse {
        svids: vec![svid(&web, "internal"), svid(&api, "")],
        crl: vec![],
        federated_bundles: HashMap::from([(
            "spiffe://partner.org".to_string(),
            partner.root_der().to_vec(),
        )]),
    };
    let fixture = ApiFixture {
        leaves: vec![web.chain_der[0].clone(), api.chain_der[0].clone()],
        keys: vec![key_der(&web.key_pem), key_der(&api.key_pem)],
        ders: vec![
            concat(&web.chain_der),
            concat(&api.chain_der),
            bundle.clone(),
            partner.root_der().to_vec(),
            mid.cert_der().to_vec(),
            web.chain_der[0].to_vec(),
        ],
        response,
        now: SystemTime::now(),
    };
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    identity_from_response(fixture.response.clone(), &provider, fixture.now)
        .expect("the unmutated response is accepted");
    fixture
});

/// Edits of the message itself, before it is encoded.
#[derive(Debug, Clone)]
enum MessageEdit {
    SwapKeys,
    Key(Index, Index),
    Der(Index, Index, bool),
    Id(Index, &'static str),
    Clear(Index, u8),
    DropSvid(Index),
    DuplicateSvid(Index),
    Federated(&'static str, Index),
    Crl(Vec<u8>),
}

const IDS: &[&str] = &[
    "spiffe://example.org/web",
    "spiffe://example.org/api",
    "spiffe://example.org",
    "spiffe://partner.org/web",
    "spiffe://Example.org/web",
    "",
    "example.org/web",
];
const FEDERATED_KEYS: &[&str] = &[
    "spiffe://partner.org",
    "partner.org",
    "spiffe://example.org",
    "example.org",
    "",
    "spiffe://partner.org/web",
    "spiffe://Partner.org",
    "spiffe://other.org",
];

fn edit_message(response: &mut X509svidResponse, edit: &MessageEdit) {
    let api = &*API;
    let n = response.svids.len();
    match edit {
        MessageEdit::SwapKeys if n >= 2 => {
            let key = std::mem::take(&mut response.svids[0].x509_svid_key);
            response.svids[0].x509_svid_key =
                std::mem::replace(&mut response.svids[1].x509_svid_key, key);
        }
        MessageEdit::Key(i, k) if n > 0 => {
            response.svids[i.index(n)].x509_svid_key = api.keys[k.index(api.keys.len())].clone();
        }
        MessageEdit::Der(i, d, bundle) if n > 0 => {
            let der = api.ders[d.index(api.ders.len())].clone();
            let svid = &mut response.svids[i.index(n)];
            if *bundle {
                svid.bundle = der;
            } else {
                svid.x509_svid = der;
            }
        }
        MessageEdit::Id(i, id) if n > 0 => response.svids[i.index(n)].spiffe_id = (*id).to_string(),
        MessageEdit::Clear(i, field) if n > 0 => {
            let svid = &mut response.svids[i.index(n)];
            match field % 5 {
                0 => svid.spiffe_id.clear(),
                1 => svid.x509_svid.clear(),
                2 => svid.x509_svid_key.clear(),
                3 => svid.bundle.clear(),
                _ => svid.hint.clear(),
            }
        }
        MessageEdit::DropSvid(i) if n > 0 => {
            response.svids.remove(i.index(n));
        }
        MessageEdit::DuplicateSvid(i) if n > 0 => {
            let svid = response.svids[i.index(n)].clone();
            response.svids.push(svid);
        }
        MessageEdit::Federated(key, d) => {
            response.federated_bundles.insert(
                (*key).to_string(),
                api.ders[d.index(api.ders.len())].clone(),
            );
        }
        MessageEdit::Crl(crl) => response.crl.push(crl.clone()),
        _ => {}
    }
}

fn message_edit() -> impl Strategy<Value = MessageEdit> {
    prop_oneof![
        Just(MessageEdit::SwapKeys),
        (any::<Index>(), any::<Index>()).prop_map(|(i, k)| MessageEdit::Key(i, k)),
        (any::<Index>(), any::<Index>(), prop::bool::ANY)
            .prop_map(|(i, d, b)| MessageEdit::Der(i, d, b)),
        (any::<Index>(), select(IDS)).prop_map(|(i, id)| MessageEdit::Id(i, id)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, f)| MessageEdit::Clear(i, f)),
        any::<Index>().prop_map(MessageEdit::DropSvid),
        any::<Index>().prop_map(MessageEdit::DuplicateSvid),
        (select(FEDERATED_KEYS), any::<Index>()).prop_map(|(k, d)| MessageEdit::Federated(k, d)),
        prop::collection::vec(any::<u8>(), 0..16).prop_map(MessageEdit::Crl),
    ]
}

const PROTOBUF_DICTIONARY: &[&[u8]] = &[
    b"\x0a",
    b"\x12",
    b"\x1a",
    b"\x22",
    b"\x2a",
    b"\x08",
    b"\x00",
    b"\x80\x01",
    b"\xff\xff\xff\xff\x0f",
    b"\x0a\x00",
    b"\x12\x00",
    b"spiffe://",
    b"\x30\x82",
];

/// True if the SVID's private key makes signatures its leaf's public key
/// verifies: the key really belongs to the certificate.
fn key_signs_for_leaf(svid: &Svid) -> Result<(), String> {
    let ck = &svid.certified_key;
    ck.keys_match().map_err(|e| format!("keys_match: {e}"))?;
    let schemes = [
        SignatureScheme::ECDSA_NISTP256_SHA256,
        SignatureScheme::ECDSA_NISTP384_SHA384,
        SignatureScheme::ED25519,
        SignatureScheme::RSA_PSS_SHA256,
        SignatureScheme::RSA_PKCS1_SHA256,
    ];
    let signer = ck
        .key
        .choose_scheme(&schemes)
        .ok_or("no usable signature scheme")?;
    let message = b"spiffe-tunnel fuzz: does this key belong to this certificate?";
    let signature = signer.sign(message).map_err(|e| format!("sign: {e}"))?;
    let leaf = webpki::EndEntityCert::try_from(&ck.cert[0]).map_err(|e| format!("leaf: {e:?}"))?;
    let algorithms =
        rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
    let (_, candidates) = algorithms
        .mapping
        .iter()
        .find(|(scheme, _)| *scheme == signer.scheme())
        .ok_or("scheme has no verification algorithm")?;
    candidates
        .iter()
        .any(|alg| leaf.verify_signature(*alg, message, &signature).is_ok())
        .then_some(())
        .ok_or_else(|| format!("{} signature does not verify with the leaf's key", svid.id))
}

#[test]
fn fuzz_workload_api_response() {
    let strategy = (
        prop::collection::vec(message_edit(), 0..3),
        prop::collection::vec(mutation(PROTOBUF_DICTIONARY), 0..4),
    );
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    fuzz(
        "fuzz_workload_api_response",
        1500,
        strategy,
        |(edits, mutations)| {
            let api = &*API;
            let mut response = api.response.clone();
            for edit in &edits {
                edit_message(&mut response, edit);
            }
            let mut bytes = response.encode_to_vec();
            for m in &mutations {
                apply(&mut bytes, m);
            }
            let Ok(decoded) = X509svidResponse::decode(bytes.as_slice()) else {
                return Ok(false);
            };
            let Ok(identity) = identity_from_response(decoded, &provider, api.now) else {
                return Ok(false);
            };
            prop_assert!(!identity.svids.is_empty());
            for svid in &identity.svids {
                if let Err(e) = key_signs_for_leaf(svid) {
                    return Err(TestCaseError::fail(format!(
                        "accepted an SVID whose key does not match: {e}"
                    )));
                }
                prop_assert!(
                    api.leaves.contains(&svid.chain()[0]),
                    "accepted a leaf that is not one the CA issued: {}",
                    svid.id
                );
                prop_assert!(spiffe_id::parse_workload_id(&svid.id.to_string()).is_ok());
                let verified = verify_svid_chain(
                    svid.chain(),
                    &identity.bundles,
                    UnixTime::now(),
                    PeerRole::Any,
                );
                prop_assert!(verified.is_ok(), "{:?}", verified);
            }
            Ok(true)
        },
    );
}

// ---- exhaustive checks and regressions ---------------------------------------

/// Every single-bit flip anywhere in the leaf or the intermediate of a
/// chain is refused: not one bit of a certificate is outside what the
/// signatures and the DER parser check.
#[test]
fn every_single_bit_flip_of_a_chain_is_refused() {
    let chains = &*CHAINS;
    let mut tried = 0;
    for n in 0..chains.deep.len() {
        let cert = chains.deep[n].to_vec();
        for byte in 0..cert.len() {
            for bit in 0..8 {
                let mut chain: Vec<CertificateDer<'static>> = chains.deep.clone();
                let mut flipped = cert.clone();
                flipped[byte] ^= 1 << bit;
                chain[n] = CertificateDer::from(flipped);
                let result = verify_svid_chain(&chain, &chains.bundles, chains.now, PeerRole::Any);
                assert!(
                    result.is_err(),
                    "certificate {n}: flipping bit {bit} of byte {byte} still verifies: {result:?}"
                );
                tried += 1;
            }
        }
    }
    eprintln!("every_single_bit_flip_of_a_chain_is_refused: {tried} flips refused");
}

/// Found by `fuzz_config_parser`: `Config::parse` accepted any humantime
/// duration up to 2^64 seconds, and the inbound and outbound data path
/// computes its idle deadline as `Instant::now() + idle_timeout`
/// (`src/proxy/copy.rs`), which panics ("overflow when adding duration to
/// instant") on the first connection through a tunnel with, say,
/// `idle_timeout = "300000000000y"`. (Where Instant is narrower, as on
/// macOS, tokio notes that 1000 years already overflows.) A config that
/// parses must be one that can run, so such durations must be refused.
#[test]
fn regression_durations_too_long_for_a_deadline_are_refused() {
    for key in [
        "handshake_timeout",
        "connect_timeout",
        "idle_timeout",
        "drain_timeout",
    ] {
        for value in ["300000000000y", "18446744073709551615s"] {
            let text = format!(
                "[identity]\nsource = \"workload_api\"\n\n[defaults]\n{key} = \"{value}\"\n\n\
                 [[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:8443\"\n\
                 target = \"127.0.0.1:3000\"\nallow = [\"spiffe://example.org/web\"]\n"
            );
            if let Err(e) = check_config(&text) {
                panic!("[defaults] {key} = {value:?}: {e}");
            }
        }
    }
}

/// The same bug from the data path's side: `copy::pipe` must not panic
/// whatever idle timeout it is given (a saturating or checked deadline).
#[tokio::test]
async fn regression_pipe_survives_an_idle_timeout_too_long_for_a_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client, mut client_peer) = tokio::io::duplex(1024);
    let (mut server, mut server_peer) = tokio::io::duplex(1024);
    let task = tokio::spawn(async move {
        let cancel = tokio_util::sync::CancellationToken::new();
        spiffe_tunnel::proxy::copy::pipe(&mut client, &mut server, Duration::MAX, &cancel)
            .await
            .0
    });
    let exchange = async {
        client_peer.write_all(b"ping").await.unwrap();
        client_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        server_peer.read_to_end(&mut got).await.unwrap();
        server_peer.shutdown().await.unwrap();
        got
    };
    let got = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("pipe stalled");
    let moved = task
        .await
        .expect("copy::pipe panicked with idle_timeout = Duration::MAX");
    assert_eq!(got, b"ping");
    assert_eq!(moved.client_to_server, 4);
}

/// Found by `fuzz_workload_api_response` (a bit flip turned the year of the
/// leaf's notAfter from 26 into 66, i.e. 1966: UTCTime years 50-99 are
/// 1950-1999). `Identity::new` (`src/identity/mod.rs`) reports an expired
/// SVID with `humantime::format_rfc3339_seconds(svid.not_after)`, which
/// panics ("all times should be after the epoch") for any time before
/// 1970. So a Workload API response, or an SVID file, with such a
/// certificate panicked the task reading it instead of being refused.
#[test]
fn regression_svid_that_expired_before_1970_is_refused_without_a_panic() {
    let ca = Ca::new("example.org");
    let leaf = ca
        .leaf_builder("spiffe://example.org/web")
        .params(|p| {
            p.not_before = rcgen::date_time_ymd(1960, 1, 1);
            p.not_after = rcgen::date_time_ymd(1966, 11, 22);
        })
        .build();
    let response = X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: leaf.id.clone(),
            x509_svid: leaf.chain_der.iter().flat_map(|c| c.to_vec()).collect(),
            x509_svid_key: key_der(&leaf.key_pem),
            bundle: ca.root_der().to_vec(),
            hint: String::new(),
        }],
        ..Default::default()
    };
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        identity_from_response(response, &provider, SystemTime::now()).map(drop)
    }));
    match outcome {
        Ok(Err(e)) => assert!(e.to_string().contains("expired"), "{e}"),
        Ok(Ok(())) => panic!("an SVID that expired in 1966 was accepted"),
        Err(_) => panic!("identity_from_response panicked on an SVID that expired in 1966"),
    }
}

/// Found by `fuzz_config_parser` (`filter = "\t0¡="`): tracing-subscriber
/// 0.3.23's `Directive::parse` walks the *trimmed* directive with
/// `char_indices` but slices the untrimmed one with those indices, so a
/// directive with leading whitespace and a non-ASCII character panics
/// ("byte index is not a char boundary"). `Config::parse` validates
/// `[log] filter` with `EnvFilter::try_new`, so an ordinary-looking
/// `filter = "info, é=debug"` panicked `check`, `run` and reloads instead
/// of being refused (or accepted) with a message.
#[test]
fn regression_log_filter_with_whitespace_and_non_ascii_does_not_panic() {
    for filter in ["info, é=debug", "\t0¡=", " é", "info,\u{a0}x=debug"] {
        let text = format!(
            "[identity]\nsource = \"workload_api\"\n[log]\nfilter = {}\n\
             [[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:8443\"\n\
             target = \"127.0.0.1:3000\"\nallow = [\"spiffe://example.org/web\"]\n",
            toml_string(filter)
        );
        let outcome = std::panic::catch_unwind(|| check_config(&text));
        match outcome {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("filter = {filter:?}: {e}"),
            Err(_) => panic!("Config::parse panicked on [log] filter = {filter:?}"),
        }
    }
}

/// The same tracing-subscriber bug through `RUST_LOG`, which every command
/// reads at start (`init_logging` in `src/main.rs`): the process must not
/// die with a panic (exit 101) because of a space and an accent in it.
#[test]
fn regression_rust_log_with_whitespace_and_non_ascii_does_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spiffe-tunnel"))
        .args(["check", "-c", missing.to_str().unwrap()])
        .env("RUST_LOG", "info, é=debug")
        .output()
        .expect("run spiffe-tunnel");
    assert_eq!(
        out.status.code(),
        Some(2),
        "`check` of a missing file with RUST_LOG=\"info, é=debug\" should exit 2:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
