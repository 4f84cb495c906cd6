//! The policy matcher: a decision over 10 and 10,000 rules, hit and miss.
//!
//! The matcher walks a trie of path segments, so a decision should cost the
//! same whatever the rule count; this shows whether it does. Every handshake
//! makes one decision (twice on an inbound: in the verifier and again after
//! it), so this is a per-connection cost.
//!
//! Run: `cargo bench --bench policy`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use spiffe_tunnel::policy::{parse_rule, Decision, Policy, Rule};
use spiffe_tunnel::spiffe_id::{self, SpiffeId};

/// `n` rules shaped like a large deployment's: mostly exact workload IDs
/// across a few trust domains, some one-segment (`*`) and prefix (`**`)
/// wildcards, and a few denies.
fn rules(n: usize) -> Vec<Rule> {
    let mut lines = Vec::with_capacity(n);
    for i in 0..n {
        let td = format!("td{}.example.org", i % 4);
        let ns = i % 97;
        let line = match i % 20 {
            0 => format!("spiffe://{td}/ns/ns{ns}/sa/*"),
            1 => format!("spiffe://{td}/team/t{i}/**"),
            2 => format!("deny spiffe://{td}/ns/ns{ns}/sa/legacy{i}"),
            3 => format!("spiffe://{td}/ns/*/sa/batch{i}"),
            _ => format!("spiffe://{td}/ns/ns{ns}/sa/svc{i}"),
        };
        lines.push(line);
    }
    lines
        .iter()
        .map(|l| parse_rule(l).expect("valid rule").expect("not blank"))
        .collect()
}

fn id(s: &str) -> SpiffeId {
    spiffe_id::parse(s).expect("valid SPIFFE ID")
}

fn bench_policy(c: &mut Criterion) {
    // IDs decided by each rule set: an exact hit near the end of the list,
    // a hit through `*`, a hit through `**` (deep path), a deny, a miss
    // under a known prefix, and a miss in an unknown trust domain.
    let cases = [
        ("hit_exact", "spiffe://td3.example.org/ns/ns8/sa/svc9999"),
        ("hit_star", "spiffe://td0.example.org/ns/ns0/sa/anything"),
        (
            "hit_rest_deep",
            "spiffe://td1.example.org/team/t21/a/b/c/d/e",
        ),
        ("deny", "spiffe://td2.example.org/ns/ns42/sa/legacy42"),
        ("miss_known_td", "spiffe://td1.example.org/ns/ns5/sa/nobody"),
        ("miss_unknown_td", "spiffe://other.org/ns/ns5/sa/svc9999"),
    ];
    for n in [10usize, 10_000] {
        let policy = Policy::compile(rules(n));
        assert_eq!(policy.len(), n);
        let mut group = c.benchmark_group(format!("policy_decide/{n}_rules"));
        for (name, text) in cases {
            let peer = id(text);
            if n == 10_000 {
                // Keep the cases honest: each one decides the way it says.
                let d = policy.decide(&peer);
                let ok = match name {
                    n if n.starts_with("hit") => matches!(d, Decision::Allowed(_)),
                    "deny" => matches!(d, Decision::Denied(_)),
                    _ => matches!(d, Decision::NoMatch),
                };
                assert!(ok, "{name}: {text} decided {d:?}");
            }
            group.bench_function(name, |b| {
                b.iter(|| black_box(policy.decide(black_box(&peer))))
            });
        }
        group.finish();
    }

    // Compiling (what a SIGHUP reload of a 10k-rule file costs, parse excluded).
    let many = rules(10_000);
    c.bench_function("policy_compile/10000_rules", |b| {
        b.iter_batched(|| many.clone(), Policy::compile, BatchSize::LargeInput)
    });
    // Parsing and validating 10k lines (the rest of a reload).
    let text: String = many.iter().map(|r| format!("{r}\n")).collect();
    c.bench_function("policy_parse/10000_rules", |b| {
        b.iter(|| {
            spiffe_tunnel::policy::parse_rules(black_box(&text), "bench.policy").expect("valid")
        })
    });
}

criterion_group!(benches, bench_policy);
criterion_main!(benches);
