//! The documentation stays true: every fenced `toml` block of `README.md`
//! and `docs/*.md` is TOML, every one that is a whole config passes
//! `spiffe-tunnel check` (as `tests/deploy.rs` does for `deploy/`), every
//! relative link points at a file that exists (and at a heading of it, for
//! `page.md#anchor`), and every page is reachable from the README.
//!
//! A block is a whole config when it has an `[identity]` table and at least
//! one `[[inbound]]` or `[[outbound]]`; any other block is a fragment, parsed
//! but not checked. The files a whole config names (identity certificates,
//! policy files) are made for it in a temporary folder, so `check` runs in
//! full, identity files included.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::certs::Ca;

const BIN: &str = env!("CARGO_BIN_EXE_spiffe-tunnel");

/// At least this many whole configs are in the docs today; fewer means the
/// extraction broke (or examples were cut), not that all is well.
const MIN_CHECKED_CONFIGS: usize = 4;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `README.md` and every page under `docs/`, sorted.
fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![repo().join("README.md")];
    let mut pages: Vec<PathBuf> = fs::read_dir(repo().join("docs"))
        .expect("docs/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    assert!(!pages.is_empty(), "no pages in docs/");
    files.extend(pages);
    files
}

fn rel(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// A fenced code block: its info string's first word, the line of its
/// opening fence (1-based) and its text.
#[derive(Debug, PartialEq)]
struct Block {
    lang: String,
    line: usize,
    text: String,
}

/// Splits markdown into fenced code blocks and the prose between them: each
/// prose line comes with its line number. Fences are ``` or ~~~ (three or
/// more), possibly indented (inside list items); a block ends at a fence of
/// the same character at least as long.
fn split_markdown(text: &str) -> (Vec<Block>, Vec<(usize, &str)>) {
    let mut blocks = Vec::new();
    let mut prose = Vec::new();
    let mut open: Option<(char, usize, usize, String, usize)> = None; // char, len, indent, lang, line
    let mut body = String::new();
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let fence = trimmed
            .chars()
            .next()
            .filter(|c| *c == '`' || *c == '~')
            .map(|c| (c, trimmed.chars().take_while(|x| *x == c).count()))
            .filter(|(_, len)| *len >= 3);
        match (&open, fence) {
            (None, Some((c, len))) => {
                let lang = trimmed[len..].split_whitespace().next().unwrap_or("");
                open = Some((c, len, indent, lang.to_string(), n + 1));
                body.clear();
            }
            (Some((c, len, _, _, _)), Some((fc, flen)))
                if fc == *c && flen >= *len && trimmed[flen..].trim().is_empty() =>
            {
                let (_, _, _, lang, line) = open.take().unwrap();
                blocks.push(Block {
                    lang,
                    line,
                    text: std::mem::take(&mut body),
                });
            }
            (Some((_, _, indent, _, _)), _) => {
                // Content lines lose the fence's indentation, as CommonMark says.
                let strip = line.len() - line.trim_start().len();
                body.push_str(&line[strip.min(*indent)..]);
                body.push('\n');
            }
            (None, None) => prose.push((n + 1, line)),
        }
    }
    assert!(open.is_none(), "unclosed code fence: {open:?}");
    (blocks, prose)
}

fn is_whole_config(table: &toml::Table) -> bool {
    table.get("identity").is_some_and(toml::Value::is_table)
        && ["inbound", "outbound"]
            .iter()
            .any(|k| table.get(*k).is_some_and(toml::Value::is_array))
}

/// Every tunnel table of a config.
fn tunnels(config: &toml::Table) -> impl Iterator<Item = &toml::Table> {
    ["inbound", "outbound"]
        .into_iter()
        .filter_map(|kind| config.get(kind).and_then(toml::Value::as_array))
        .flatten()
        .filter_map(toml::Value::as_table)
}

fn str_key<'a>(table: &'a toml::Table, key: &str) -> Option<&'a str> {
    table.get(key).and_then(toml::Value::as_str)
}

/// Writes `contents` at `name` under `dir`; names in the docs are relative
/// (an absolute one could not be given to a test and is refused).
fn write_named(dir: &Path, name: &str, contents: &str, shown: &str) {
    assert!(
        Path::new(name).is_relative(),
        "{shown}: {name:?}: use a path relative to the config in examples"
    );
    let path = dir.join(name);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, contents).unwrap();
}

/// Makes the files a config names, in `dir` (the config's folder): for
/// `source = "files"`, a CA per trust domain of `[identity.bundles]` and an
/// SVID signed by one of them (the ID the first tunnel's `svid` asks for,
/// else one of the first bundle's trust domain); for each tunnel's `policy`,
/// a policy file with one rule.
fn provide_named_files(config: &toml::Table, dir: &Path, shown: &str) {
    let identity = config["identity"].as_table().unwrap();
    if str_key(identity, "source") == Some("files") {
        let bundles: BTreeMap<&str, &str> = identity
            .get("bundles")
            .and_then(toml::Value::as_table)
            .map(|b| {
                b.iter()
                    .filter_map(|(td, f)| Some((td.as_str(), f.as_str()?)))
                    .collect()
            })
            .unwrap_or_default();
        let first_td = bundles
            .keys()
            .next()
            .unwrap_or_else(|| panic!("{shown}: source = \"files\" without [identity.bundles]"));
        let cas: BTreeMap<&str, Ca> = bundles.keys().map(|td| (*td, Ca::new(td))).collect();
        for (td, file) in &bundles {
            write_named(dir, file, cas[td].bundle_pem(), shown);
        }
        let id = tunnels(config)
            .find_map(|t| str_key(t, "svid"))
            .map_or_else(|| format!("spiffe://{first_td}/docs"), str::to_string);
        let td = id
            .strip_prefix("spiffe://")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("{shown}: svid {id:?} is not a SPIFFE ID"));
        let ca = cas
            .get(td)
            .unwrap_or_else(|| panic!("{shown}: svid {id:?}: no bundle for {td}"));
        let leaf = ca.leaf(&id);
        let cert = str_key(identity, "cert").unwrap_or_else(|| panic!("{shown}: no cert"));
        let key = str_key(identity, "key").unwrap_or_else(|| panic!("{shown}: no key"));
        write_named(dir, cert, &leaf.chain_pem, shown);
        write_named(dir, key, &leaf.key_pem, shown);
    }
    for tunnel in tunnels(config) {
        if let Some(file) = str_key(tunnel, "policy") {
            let rules = "# made by tests/docs.rs for the example that names it\nspiffe://example.org/docs\n";
            write_named(dir, file, rules, shown);
        }
    }
}

/// Runs `spiffe-tunnel check -c FILE`; the error carries what it printed.
fn check(config: &Path, shown: &str) -> Result<(), String> {
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(config)
        .output()
        .map_err(|e| format!("{shown}: cannot run {BIN}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{shown}: `check` exited {:?}\n{}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `check` names lines of the temporary config; point them at the page
/// instead (`FILE:N:` becomes `page.md:M:`, M the page's line).
fn at_page_lines(output: &str, config: &Path, page: &str, fence_line: usize) -> String {
    let prefix = format!("{}:", config.display());
    output
        .lines()
        .map(|line| {
            let Some(rest) = line.strip_prefix(&prefix) else {
                return line.replace(&config.display().to_string(), page);
            };
            match rest.split_once(':').map(|(n, r)| (n.parse::<usize>(), r)) {
                Some((Ok(n), r)) => format!("{page}:{}:{r}", fence_line + n),
                _ => format!("{page}:{rest}"),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_whole_toml_example_passes_check() {
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = Vec::new();
    let mut fragments = Vec::new();
    let mut failures = Vec::new();
    for file in markdown_files() {
        let text = fs::read_to_string(&file).unwrap();
        let (blocks, _) = split_markdown(&text);
        for block in blocks.iter().filter(|b| b.lang == "toml") {
            let shown = format!("{}:{}", rel(&file), block.line);
            let table = match block.text.parse::<toml::Table>() {
                Ok(t) => t,
                Err(e) => {
                    failures.push(format!("{shown}: not valid TOML: {e}"));
                    continue;
                }
            };
            if !is_whole_config(&table) {
                fragments.push(shown);
                continue;
            }
            let dir = tmp.path().join(checked.len().to_string());
            fs::create_dir_all(&dir).unwrap();
            provide_named_files(&table, &dir, &shown);
            let config = dir.join("tunnel.toml");
            fs::write(&config, &block.text).unwrap();
            if let Err(e) = check(&config, &shown) {
                failures.push(at_page_lines(&e, &config, &rel(&file), block.line));
            }
            checked.push(shown);
        }
    }
    println!(
        "checked {} whole configs: {checked:?}\nskipped {} fragments: {fragments:?}",
        checked.len(),
        fragments.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        checked.len() >= MIN_CHECKED_CONFIGS,
        "only {} whole configs found in the docs ({checked:?}); expected at least {MIN_CHECKED_CONFIGS}",
        checked.len()
    );
}

/// GitHub's anchor for a heading: its text as rendered (links and code
/// marks removed), lower-cased, every character but letters, digits, `-`,
/// `_` and spaces dropped, spaces turned into `-`.
fn slug(heading: &str) -> String {
    let mut text = String::new();
    let mut rest = heading;
    // [text](url) renders as text.
    while let Some(open) = rest.find('[') {
        let Some(mid) = rest[open..].find("](").map(|m| open + m) else {
            break;
        };
        let Some(close) = rest[mid..].find(')').map(|c| mid + c) else {
            break;
        };
        text.push_str(&rest[..open]);
        text.push_str(&rest[open + 1..mid]);
        rest = &rest[close + 1..];
    }
    text.push_str(rest);
    text.trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a markdown file's headings; a repeated one gets `-1`,
/// `-2`, ... as on GitHub.
fn anchors(text: &str) -> BTreeSet<String> {
    let (_, prose) = split_markdown(text);
    let mut seen = BTreeMap::<String, usize>::new();
    let mut found = BTreeSet::new();
    for (_, line) in prose {
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let heading = line[hashes..].trim().trim_end_matches('#').trim();
        let base = slug(heading);
        let n = seen.entry(base.clone()).or_default();
        found.insert(if *n == 0 { base } else { format!("{base}-{n}") });
        *n += 1;
    }
    found
}

/// The link targets of a markdown text outside code: `[text](target)`,
/// `![alt](target)` and reference definitions `[name]: target`, each with
/// its line. Inline code spans are left out.
fn links(text: &str) -> Vec<(usize, String)> {
    let (_, prose) = split_markdown(text);
    let mut found = Vec::new();
    for (n, line) in prose {
        // Drop `code spans` (a link inside one is not a link).
        let mut plain = String::new();
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '`' {
                let mut ticks = 1;
                while chars.peek() == Some(&'`') {
                    chars.next();
                    ticks += 1;
                }
                let close = "`".repeat(ticks);
                let rest: String = chars.clone().collect();
                if let Some(end) = rest.find(&close) {
                    let skip = rest[..end + ticks].chars().count();
                    for _ in 0..skip {
                        chars.next();
                    }
                    plain.push_str("code");
                    continue;
                }
                plain.push_str(&close);
                continue;
            }
            plain.push(c);
        }
        let trimmed = plain.trim_start();
        if let Some(def) = trimmed
            .strip_prefix('[')
            .and_then(|r| r.split_once("]:"))
            .map(|(_, target)| target.trim())
        {
            if let Some(target) = def.split_whitespace().next() {
                found.push((n, target.to_string()));
            }
            continue;
        }
        let mut rest = plain.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let end = after.find(')').unwrap_or(after.len());
            let target = after[..end].split_whitespace().next().unwrap_or("");
            found.push((n, target.trim_matches(['<', '>']).to_string()));
            rest = &after[end..];
        }
    }
    found
}

/// Why a link target is broken, or `None` when it resolves. `from` is the
/// file the link is in; `anchors_of` gives the anchors of a markdown file.
fn broken_link(
    from: &Path,
    target: &str,
    anchors_of: &mut dyn FnMut(&Path) -> BTreeSet<String>,
) -> Option<String> {
    if target.is_empty() {
        return Some("empty link".into());
    }
    if target.contains("://") || target.starts_with("mailto:") {
        return None; // not relative: outside this check
    }
    let (path, anchor) = match target.split_once('#') {
        Some((p, a)) => (p, Some(a)),
        None => (target, None),
    };
    let file = if path.is_empty() {
        from.to_path_buf()
    } else if path.starts_with('/') {
        return Some("an absolute path: links must be relative to the page".into());
    } else {
        from.parent().unwrap().join(path)
    };
    if !file.exists() {
        return Some(format!("{} does not exist", rel(&file)));
    }
    let anchor = anchor?;
    if file.extension().is_none_or(|e| e != "md") {
        return Some(format!("#{anchor} on a file that is not markdown"));
    }
    let known = anchors_of(&file);
    if known.contains(anchor) {
        None
    } else {
        Some(format!(
            "{} has no heading with anchor #{anchor} (it has: {})",
            rel(&file),
            known.into_iter().collect::<Vec<_>>().join(", ")
        ))
    }
}

#[test]
fn every_relative_link_resolves() {
    let mut cache = BTreeMap::<PathBuf, BTreeSet<String>>::new();
    let mut anchors_of = |file: &Path| {
        cache
            .entry(file.to_path_buf())
            .or_insert_with(|| anchors(&fs::read_to_string(file).unwrap()))
            .clone()
    };
    let mut failures = Vec::new();
    let mut relative = 0;
    for file in markdown_files() {
        let text = fs::read_to_string(&file).unwrap();
        for (line, target) in links(&text) {
            if !target.contains("://") {
                relative += 1;
            }
            if let Some(why) = broken_link(&file, &target, &mut anchors_of) {
                failures.push(format!("{}:{line}: ({target}): {why}", rel(&file)));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The README links every page, so a link extractor that finds nothing
    // is broken.
    assert!(relative >= 10, "only {relative} relative links found");
}

#[test]
fn every_docs_page_is_linked_from_the_readme_and_says_what_it_covers() {
    let readme = fs::read_to_string(repo().join("README.md")).unwrap();
    let linked: BTreeSet<PathBuf> = links(&readme)
        .into_iter()
        .map(|(_, t)| t.split('#').next().unwrap().to_string())
        .filter(|t| !t.is_empty() && !t.contains("://"))
        .map(|t| repo().join(t))
        .collect();
    for page in markdown_files().into_iter().skip(1) {
        assert!(
            linked.contains(&page),
            "{} is not linked from README.md",
            rel(&page)
        );
        let text = fs::read_to_string(&page).unwrap();
        let mut paragraphs = text.split("\n\n").map(str::trim);
        let title = paragraphs.next().unwrap_or("");
        assert!(
            title.starts_with("# ") && !title.contains('\n'),
            "{}: must begin with one `# Title` line",
            rel(&page)
        );
        let first = paragraphs.next().unwrap_or("");
        assert!(
            first.starts_with("This page covers "),
            "{}: the first paragraph must say what the page covers (\"This page covers ...\"), found {first:?}",
            rel(&page)
        );
    }
}

#[test]
fn markdown_parsing_finds_blocks_links_and_anchors() {
    let text = "\
# Title: `run` and [more](x.md)

Text with [a link](other.md#some-part), `[not a link](nowhere.md)` and
![an image](img.png).

- a list item
  ```toml
  [identity]
  source = \"files\"
  ```

````sh
```
[inside](code.md)
````

[ref]: docs/ref.md
## Title: `run` and more
### Reload, revocation and drain
";
    let (blocks, _) = split_markdown(text);
    assert_eq!(
        blocks,
        [
            Block {
                lang: "toml".into(),
                line: 7,
                text: "[identity]\nsource = \"files\"\n".into()
            },
            Block {
                lang: "sh".into(),
                line: 12,
                text: "```\n[inside](code.md)\n".into()
            },
        ]
    );
    let targets: Vec<String> = links(text).into_iter().map(|(_, t)| t).collect();
    assert_eq!(
        targets,
        ["x.md", "other.md#some-part", "img.png", "docs/ref.md"]
    );
    assert_eq!(
        anchors(text),
        BTreeSet::from([
            "title-run-and-more".to_string(),
            "title-run-and-more-1".to_string(),
            "reload-revocation-and-drain".to_string(),
        ])
    );
    assert_eq!(
        slug("Upgrades without dropping connections"),
        "upgrades-without-dropping-connections"
    );
    assert_eq!(slug("PROXY protocol v2"), "proxy-protocol-v2");
    assert_eq!(
        slug("With file identities (no SPIRE needed)"),
        "with-file-identities-no-spire-needed"
    );
}
