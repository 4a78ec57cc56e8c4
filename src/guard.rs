//! The guard policy: which paths (relative to the mount root) are protected,
//! so that deleting or replacing them sends them to the quarantine instead.
//!
//! Pure policy, no I/O. Globs are matched component by component:
//! - `*` any run of characters within one component (leading dots included),
//! - `?` exactly one character within one component,
//! - `[abc]`, `[a-z]`, `[!x]` (or `[^x]`) one character from a class
//!   (`]` is literal as the first member: `[]x]`),
//! - `**` as a whole component: any number of components. A trailing `**`
//!   needs at least one component, so `_base/**` protects everything *under*
//!   `_base/` but not the directory `_base` itself; elsewhere it may match none
//!   (`a/**/b` matches `a/b`).
//!
//! A path is protected when it matches at least one protect glob and no
//! ignore glob. The default protects `_base/**` and ignores Nova's download
//! temporaries `_base/*.part` and `_base/*.converted`.

use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

/// The protect globs used when `--protect` is not given.
pub const DEFAULT_PROTECT: &[&str] = &["_base/**"];
/// The ignore globs used when `--ignore` is not given.
pub const DEFAULT_IGNORE: &[&str] = &["_base/*.part", "_base/*.converted"];

/// The compiled policy. Cheap to clone; matching allocates nothing.
#[derive(Clone, Debug)]
pub struct Guard {
    protect: Vec<Glob>,
    ignore: Vec<Glob>,
}

impl Default for Guard {
    fn default() -> Guard {
        let p: Vec<String> = DEFAULT_PROTECT.iter().map(|s| s.to_string()).collect();
        let i: Vec<String> = DEFAULT_IGNORE.iter().map(|s| s.to_string()).collect();
        // The defaults are valid globs (checked by a unit test).
        Guard::new(&p, &i).unwrap_or(Guard {
            protect: Vec::new(),
            ignore: Vec::new(),
        })
    }
}

impl Guard {
    /// Compile a policy. An empty `protect` protects nothing; pass
    /// [`DEFAULT_PROTECT`]/[`DEFAULT_IGNORE`] for the defaults (or use
    /// [`Guard::default`]). Errors are one sentence naming the bad glob.
    pub fn new(protect: &[String], ignore: &[String]) -> Result<Guard, String> {
        Ok(Guard {
            protect: protect
                .iter()
                .map(|g| Glob::parse(g))
                .collect::<Result<_, _>>()?,
            ignore: ignore
                .iter()
                .map(|g| Glob::parse(g))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Build from command-line options: `None` keeps the default set, `Some`
    /// replaces it (`Some(&[])` means "none").
    pub fn from_options(
        protect: Option<&[String]>,
        ignore: Option<&[String]>,
    ) -> Result<Guard, String> {
        let dp: Vec<String> = DEFAULT_PROTECT.iter().map(|s| s.to_string()).collect();
        let di: Vec<String> = DEFAULT_IGNORE.iter().map(|s| s.to_string()).collect();
        Guard::new(protect.unwrap_or(&dp), ignore.unwrap_or(&di))
    }

    /// Is `rel` (relative to the mount root, e.g. `_base/abc`) protected?
    /// `.` components are skipped; a leading `/` is ignored; a path with `..`
    /// is never protected (the FUSE layer only hands in resolved paths).
    pub fn protects(&self, rel: &Path) -> bool {
        let mut comps: [&[u8]; 32] = [&[]; 32];
        let mut n = 0;
        let mut long: Vec<&[u8]> = Vec::new();
        for c in rel.components() {
            let b = match c {
                Component::Normal(s) => s.as_bytes(),
                Component::CurDir | Component::RootDir | Component::Prefix(_) => continue,
                Component::ParentDir => return false,
            };
            if n < comps.len() {
                comps[n] = b;
            } else {
                if long.is_empty() {
                    long.extend_from_slice(&comps);
                }
                long.push(b);
            }
            n += 1;
        }
        if n == 0 {
            return false;
        }
        let path: &[&[u8]] = if long.is_empty() { &comps[..n] } else { &long };
        self.protect.iter().any(|g| g.matches(path)) && !self.ignore.iter().any(|g| g.matches(path))
    }

    /// Could some path strictly below the directory `rel` be protected?
    /// (Ignore globs are not consulted: the answer errs towards "yes".) Used
    /// to refuse moving a directory out of protection as a whole.
    pub fn may_protect_below(&self, rel: &Path) -> bool {
        let mut comps: Vec<&[u8]> = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(s) => comps.push(s.as_bytes()),
                Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
                Component::ParentDir => return false,
            }
        }
        self.protect.iter().any(|g| match_prefix(&g.segs, &comps))
    }

    /// The protect globs as given.
    pub fn protect_globs(&self) -> Vec<&str> {
        self.protect.iter().map(|g| g.src.as_str()).collect()
    }
}

/// The guard a daemon applies: this node's own globs (`protect=`/`ignore=`,
/// or the layout's defaults) and the shared policy's, which the daemon swaps
/// in when `baseguard policy set` changes them. A path is protected when
/// either layer protects it: an ignore glob narrows only its own layer's
/// protect globs, so a node can never let through what the shared policy
/// protects, nor the shared policy what a node protects.
#[derive(Debug)]
pub struct LiveGuard {
    node: Guard,
    shared: parking_lot::RwLock<std::sync::Arc<Guard>>,
}

impl LiveGuard {
    /// This node's guard, with no shared globs yet.
    pub fn new(node: Guard) -> LiveGuard {
        LiveGuard {
            node,
            shared: parking_lot::RwLock::new(std::sync::Arc::new(Guard::none())),
        }
    }

    /// Put the shared policy's globs in force (from the next request on).
    pub fn set_shared(&self, g: Guard) {
        *self.shared.write() = std::sync::Arc::new(g);
    }

    /// Is `rel` protected by this node's globs or the shared ones?
    pub fn protects(&self, rel: &Path) -> bool {
        self.node.protects(rel) || self.shared.read().protects(rel)
    }

    /// [`Guard::may_protect_below`] of either layer.
    pub fn may_protect_below(&self, rel: &Path) -> bool {
        self.node.may_protect_below(rel) || self.shared.read().may_protect_below(rel)
    }

    /// The protect globs of both layers, as given.
    pub fn protect_globs(&self) -> Vec<String> {
        let shared = self.shared.read();
        let mut v: Vec<String> = self
            .node
            .protect_globs()
            .into_iter()
            .map(String::from)
            .collect();
        v.extend(shared.protect_globs().into_iter().map(String::from));
        v
    }

    /// This node's own guard.
    pub fn node(&self) -> &Guard {
        &self.node
    }
}

impl Guard {
    /// A guard that protects nothing.
    pub fn none() -> Guard {
        Guard {
            protect: Vec::new(),
            ignore: Vec::new(),
        }
    }

    /// The ignore globs as given.
    pub fn ignore_globs(&self) -> Vec<&str> {
        self.ignore.iter().map(|g| g.src.as_str()).collect()
    }
}

#[derive(Clone, Debug)]
enum Tok {
    Lit(Vec<u8>),
    Star,
    One,
    Class { neg: bool, items: Vec<(char, char)> },
}

#[derive(Clone, Debug)]
enum Seg {
    /// `**`
    Any,
    /// A plain literal component (fast path).
    Lit(Vec<u8>),
    Pat(Vec<Tok>),
}

#[derive(Clone, Debug)]
struct Glob {
    src: String,
    segs: Vec<Seg>,
}

impl Glob {
    fn parse(src: &str) -> Result<Glob, String> {
        if src.is_empty() {
            return Err(
                "an empty glob matches nothing; give a path pattern like '_base/**'".into(),
            );
        }
        if src.starts_with('/') {
            return Err(format!(
                "glob '{src}' is absolute; globs are relative to the mount root, like '_base/**'"
            ));
        }
        let mut segs = Vec::new();
        for part in src.split('/') {
            match part {
                "" => {
                    return Err(format!(
                        "glob '{src}' has an empty path component ('//' or a trailing '/')"
                    ));
                }
                "." => continue,
                ".." => {
                    return Err(format!(
                        "glob '{src}' contains '..'; globs cannot reach outside the mount root"
                    ));
                }
                "**" => {
                    // Collapse runs of `**`.
                    if !matches!(segs.last(), Some(Seg::Any)) {
                        segs.push(Seg::Any);
                    }
                }
                _ => segs.push(parse_seg(src, part)?),
            }
        }
        if segs.is_empty() {
            return Err(format!("glob '{src}' names only the mount root itself"));
        }
        Ok(Glob {
            src: src.to_string(),
            segs,
        })
    }

    fn matches(&self, path: &[&[u8]]) -> bool {
        match_segs(&self.segs, path)
    }
}

fn parse_seg(src: &str, part: &str) -> Result<Seg, String> {
    let chars: Vec<char> = part.chars().collect();
    let mut toks: Vec<Tok> = Vec::new();
    let mut i = 0;
    let push_lit = |toks: &mut Vec<Tok>, c: char| {
        let mut buf = [0u8; 4];
        let b = c.encode_utf8(&mut buf).as_bytes();
        if let Some(Tok::Lit(v)) = toks.last_mut() {
            v.extend_from_slice(b);
        } else {
            toks.push(Tok::Lit(b.to_vec()));
        }
    };
    while i < chars.len() {
        match chars[i] {
            '*' => {
                if !matches!(toks.last(), Some(Tok::Star)) {
                    toks.push(Tok::Star);
                }
                i += 1;
            }
            '?' => {
                toks.push(Tok::One);
                i += 1;
            }
            '[' => {
                let mut j = i + 1;
                let mut neg = false;
                if j < chars.len() && (chars[j] == '!' || chars[j] == '^') {
                    neg = true;
                    j += 1;
                }
                let mut items = Vec::new();
                let mut first = true;
                loop {
                    if j >= chars.len() {
                        return Err(format!(
                            "glob '{src}' has an unclosed '[' in '{part}'; close the class with ']'"
                        ));
                    }
                    let c = chars[j];
                    if c == ']' && !first {
                        j += 1;
                        break;
                    }
                    first = false;
                    if j + 2 < chars.len() && chars[j + 1] == '-' && chars[j + 2] != ']' {
                        let (lo, hi) = (c, chars[j + 2]);
                        if lo > hi {
                            return Err(format!(
                                "glob '{src}' has a reversed range '{lo}-{hi}' in '{part}'"
                            ));
                        }
                        items.push((lo, hi));
                        j += 3;
                    } else {
                        items.push((c, c));
                        j += 1;
                    }
                }
                toks.push(Tok::Class { neg, items });
                i = j;
            }
            ']' => {
                return Err(format!(
                    "glob '{src}' has a ']' without a matching '[' in '{part}'"
                ));
            }
            c => {
                push_lit(&mut toks, c);
                i += 1;
            }
        }
    }
    if let [Tok::Lit(v)] = toks.as_slice() {
        return Ok(Seg::Lit(v.clone()));
    }
    Ok(Seg::Pat(toks))
}

fn match_segs(segs: &[Seg], path: &[&[u8]]) -> bool {
    match segs.split_first() {
        None => path.is_empty(),
        Some((Seg::Any, rest)) => {
            // A trailing `**` needs at least one component.
            let min = if rest.is_empty() { 1 } else { 0 };
            (min..=path.len()).any(|k| match_segs(rest, &path[k..]))
        }
        Some((seg, rest)) => match path.split_first() {
            None => false,
            Some((c, prest)) => match_seg(seg, c) && match_segs(rest, prest),
        },
    }
}

/// Can `segs` match `path` followed by one or more further components?
fn match_prefix(segs: &[Seg], path: &[&[u8]]) -> bool {
    match (segs.split_first(), path.split_first()) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some((Seg::Any, _)), Some(_)) => true,
        (Some((seg, rest)), Some((c, prest))) => match_seg(seg, c) && match_prefix(rest, prest),
    }
}

fn match_seg(seg: &Seg, name: &[u8]) -> bool {
    match seg {
        Seg::Any => true,
        Seg::Lit(v) => v.as_slice() == name,
        Seg::Pat(toks) => match_toks(toks, name),
    }
}

/// Decode one character at the start of `b`: (char, byte length). Invalid
/// UTF-8 yields U+FFFD for one byte, so such names still match `?`/`*`.
fn next_char(b: &[u8]) -> (char, usize) {
    let len = match b[0] {
        x if x < 0x80 => 1,
        x if x >> 5 == 0b110 => 2,
        x if x >> 4 == 0b1110 => 3,
        x if x >> 3 == 0b11110 => 4,
        _ => 1,
    };
    if len <= b.len()
        && let Ok(s) = std::str::from_utf8(&b[..len])
        && let Some(c) = s.chars().next()
    {
        return (c, len);
    }
    ('\u{FFFD}', 1)
}

fn match_toks(toks: &[Tok], name: &[u8]) -> bool {
    match toks.split_first() {
        None => name.is_empty(),
        Some((Tok::Lit(v), rest)) => name.starts_with(v) && match_toks(rest, &name[v.len()..]),
        Some((Tok::Star, rest)) => {
            if rest.is_empty() {
                return true;
            }
            let mut i = 0;
            loop {
                if match_toks(rest, &name[i..]) {
                    return true;
                }
                if i >= name.len() {
                    return false;
                }
                i += next_char(&name[i..]).1;
            }
        }
        Some((Tok::One, rest)) => !name.is_empty() && match_toks(rest, &name[next_char(name).1..]),
        Some((Tok::Class { neg, items }, rest)) => {
            if name.is_empty() {
                return false;
            }
            let (c, l) = next_char(name);
            let hit = items.iter().any(|&(lo, hi)| lo <= c && c <= hi);
            hit != *neg && match_toks(rest, &name[l..])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    fn g(p: &[&str], i: &[&str]) -> Guard {
        let p: Vec<String> = p.iter().map(|s| s.to_string()).collect();
        let i: Vec<String> = i.iter().map(|s| s.to_string()).collect();
        Guard::new(&p, &i).unwrap()
    }

    fn err(p: &str) -> String {
        Guard::new(&[p.to_string()], &[]).unwrap_err()
    }

    #[test]
    fn may_protect_below() {
        let d = Guard::default();
        for (rel, want) in [
            ("", true),
            ("_base", true),
            ("_base/sub", true),
            ("_base/sub/deeper", true),
            ("inst", false),
            ("_base2", false),
            ("inst/_base", false),
        ] {
            assert_eq!(d.may_protect_below(Path::new(rel)), want, "{rel}");
        }
        let s = g(&["snap*/x/*.img"], &[]);
        assert!(s.may_protect_below(Path::new("snapA")));
        assert!(s.may_protect_below(Path::new("snapA/x")));
        assert!(!s.may_protect_below(Path::new("snapA/y")));
        assert!(!s.may_protect_below(Path::new("snapA/x/a.img")));
    }

    #[test]
    fn defaults() {
        let d = Guard::default();
        assert_eq!(d.protect_globs(), vec!["_base/**"]);
        assert!(d.protects(Path::new("_base/0123abcd")));
        assert!(d.protects(Path::new("_base/ephemeral_20_default")));
        assert!(d.protects(Path::new("_base/swap_512")));
        assert!(d.protects(Path::new("_base/deep/er/file")));
        assert!(d.protects(Path::new("./_base/x")));
        assert!(d.protects(Path::new("/_base/x")));
        assert!(!d.protects(Path::new("_base")));
        assert!(!d.protects(Path::new("_base/abc.part")));
        assert!(!d.protects(Path::new("_base/abc.converted")));
        // Only direct children are ignored.
        assert!(d.protects(Path::new("_base/sub/abc.part")));
        assert!(d.protects(Path::new("_base/abc.part.x")));
        assert!(!d.protects(Path::new("uuid/disk")));
        assert!(!d.protects(Path::new("_basex/y")));
        assert!(!d.protects(Path::new("x/_base/y")));
        assert!(!d.protects(Path::new("_base/../etc")));
        assert!(!d.protects(Path::new("")));
        assert!(d.protects(Path::new("_base/.hidden")));
    }

    #[test]
    fn wildcards_and_classes() {
        let x = g(
            &[
                "*/disk",
                "_base/[0-9a-f]?",
                "k/[!x]y",
                "m/[]a]",
                "**/*.qcow2",
            ],
            &[],
        );
        assert!(x.protects(Path::new("uuid/disk")));
        assert!(!x.protects(Path::new("uuid/disk.info")));
        assert!(!x.protects(Path::new("a/b/disk")));
        assert!(x.protects(Path::new("_base/a1")));
        assert!(x.protects(Path::new("_base/0é")));
        assert!(!x.protects(Path::new("_base/g1")));
        assert!(!x.protects(Path::new("_base/a")));
        assert!(!x.protects(Path::new("_base/a12")));
        assert!(x.protects(Path::new("k/ay")));
        assert!(!x.protects(Path::new("k/xy")));
        assert!(x.protects(Path::new("m/]")));
        assert!(x.protects(Path::new("m/a")));
        assert!(x.protects(Path::new("img.qcow2")));
        assert!(x.protects(Path::new("a/b/c/img.qcow2")));
        let y = g(&["a/**/b"], &[]);
        assert!(y.protects(Path::new("a/b")));
        assert!(y.protects(Path::new("a/x/y/b")));
        assert!(!y.protects(Path::new("a/x/y/c")));
        let z = g(&["a*b*c"], &[]);
        assert!(z.protects(Path::new("abc")));
        assert!(z.protects(Path::new("aXXbYYc")));
        assert!(!z.protects(Path::new("aXXbYY")));
    }

    #[test]
    fn non_utf8_names() {
        use std::os::unix::ffi::OsStrExt;
        let d = Guard::default();
        assert!(d.protects(Path::new(OsStr::from_bytes(b"_base/\xff\xfe"))));
        let x = g(&["_base/?"], &[]);
        assert!(x.protects(Path::new(OsStr::from_bytes(b"_base/\xff"))));
    }

    #[test]
    fn ignore_replaces_and_overrides() {
        let x = g(&["_base/**"], &["_base/keep-*"]);
        assert!(!x.protects(Path::new("_base/keep-1")));
        assert!(x.protects(Path::new("_base/x.part")));
        let none = g(&[], &[]);
        assert!(!none.protects(Path::new("_base/x")));
    }

    #[test]
    fn deep_paths() {
        let d = Guard::default();
        let deep: String = std::iter::repeat_n("d", 40).collect::<Vec<_>>().join("/");
        assert!(d.protects(Path::new(&format!("_base/{deep}"))));
    }

    #[test]
    fn malformed() {
        assert!(err("/etc/*").contains("absolute"));
        assert!(err("_base/../x").contains(".."));
        assert!(err("_base/[abc").contains("unclosed"));
        assert!(err("").contains("empty"));
        assert!(err("a//b").contains("empty path component"));
        assert!(err("_base/[z-a]").contains("reversed"));
        assert!(err("_base/a]").contains("without a matching"));
        assert!(err(".").contains("mount root"));
    }
}
