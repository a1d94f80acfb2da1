//! The crate's layering, checked on its sources (ARCHITECTURE.md, "Layering Invariant"): the
//! frame and the generic tier never name an architecture; an architecture's folder never
//! names another's; only the registry (and `lib.rs`'s module list) names the folders.

use std::fs;
use std::path::{Path, PathBuf};

fn sources(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            out.push((path, text));
        }
    }
    out
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The lines of `text` that contain one of `needles`, outside comments.
fn offending(text: &str, needles: &[&str]) -> Vec<String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .filter(|l| needles.iter().any(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

#[test]
#[cfg_attr(miri, ignore = "reads the source files, which Miri isolates")]
fn frame_and_generic_never_name_an_architecture() {
    let needles = ["crate::x86_64", "crate::aarch64", "feature_detected!", "target_feature", "std::arch::"];
    for layer in ["frame", "generic"] {
        for (path, text) in sources(&src().join(layer)) {
            let bad = offending(&text, &needles);
            assert!(bad.is_empty(), "{} names an architecture: {bad:#?}", path.display());
            // `cfg(target_arch)` only to allow what only an architecture's kernels read.
            for l in text.lines().filter(|l| l.contains("target_arch")) {
                assert!(
                    l.trim() == r#"#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]"#
                        || l.trim() == r#"#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]"#,
                    "{}: an architecture switch in the frame: {l}",
                    path.display()
                );
            }
        }
    }
    // The frame does not call the generic tier either: only through a table.
    for (path, text) in sources(&src().join("frame")) {
        let bad = offending(&text, &["crate::generic"]);
        assert!(bad.is_empty(), "{} calls the generic tier directly: {bad:#?}", path.display());
    }
}

#[test]
#[cfg_attr(miri, ignore = "reads the source files, which Miri isolates")]
fn architectures_name_only_themselves() {
    for (arch, other) in [("x86_64", "crate::aarch64"), ("aarch64", "crate::x86_64")] {
        for (path, text) in sources(&src().join(arch)) {
            let bad = offending(&text, &[other, "crate::registry"]);
            assert!(bad.is_empty(), "{} reaches outside its architecture: {bad:#?}", path.display());
        }
    }
    // AVX2 does not build on AVX-512 VNNI (the reverse is allowed).
    for (path, text) in sources(&src().join("x86_64").join("avx2")) {
        let bad = offending(&text, &["avx512vnni::"]);
        assert!(bad.is_empty(), "{} uses the tier above it: {bad:#?}", path.display());
    }
}

#[test]
#[cfg_attr(miri, ignore = "reads the source files, which Miri isolates")]
fn only_the_registry_names_the_architecture_folders() {
    for (path, text) in sources(&src()) {
        let rel = path.strip_prefix(src()).expect("under src");
        let top = rel.components().next().expect("a file").as_os_str().to_string_lossy().into_owned();
        if ["x86_64", "aarch64", "registry.rs"].contains(&top.as_str()) {
            continue;
        }
        let bad = offending(&text, &["crate::x86_64", "crate::aarch64", "x86_64::", "aarch64::"]);
        let bad: Vec<_> = bad.into_iter().filter(|l| !l.contains("std::arch::")).collect();
        assert!(bad.is_empty(), "{} names an architecture folder: {bad:#?}", rel.display());
    }
}
