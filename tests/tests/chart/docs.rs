//! Docs and image.

use super::*;

// ---------------------------------------------------------------------------
// Docs and image

#[test]
fn chart_readme_says_why_the_agent_is_privileged() {
    let readme = std::fs::read_to_string(workspace().join("chart/README.md")).expect("chart/README.md");
    for want in ["privileged", "mount", "user namespace", "cgroup", "Bidirectional", "restricted", "list"] {
        assert!(readme.contains(want), "chart/README.md should mention {want:?}");
    }
    // Every key of values.yaml has a comment right above it, but for the entries of
    // free-form maps (resource quantities, labels) that their documented parent covers.
    let values = std::fs::read_to_string(workspace().join("chart/values.yaml")).unwrap();
    let lines: Vec<&str> = values.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') || t.starts_with("- ") {
            continue;
        }
        let commented = i > 0 && lines[i - 1].trim_start().starts_with('#');
        let parent = lines[..i]
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#') && indent(l) < indent(line));
        let free_form = parent.is_some_and(|p| ["requests:", "limits:"].contains(&p.trim()));
        assert!(commented || free_form, "chart/values.yaml line {}: {line:?} has no comment above it", i + 1);
    }
}

#[test]
fn dockerfile_takes_buildkit_from_the_pinned_rootless_image() {
    let df = std::fs::read_to_string(workspace().join("Dockerfile")).expect("Dockerfile");
    assert!(df.contains("moby/buildkit:${BUILDKIT_VERSION}-rootless") && df.contains("ARG BUILDKIT_VERSION=v0.32.2"));
    for bin in ["/usr/bin/buildkitd", "/usr/bin/buildctl", "/usr/bin/buildkit-runc"] {
        assert!(df.contains(bin), "Dockerfile should copy {bin}");
    }
    for want in
        ["--mount=type=cache", "TARGETARCH", "BUILDPLATFORM", "berth-agent", "berth-shim", "org.opencontainers.image"]
    {
        assert!(df.contains(want), "Dockerfile should use {want}");
    }
    let ignore = std::fs::read_to_string(workspace().join(".dockerignore")).expect(".dockerignore");
    assert!(
        ignore.lines().any(|l| l.trim().trim_end_matches('/') == "target" || l.trim() == "/target"),
        ".dockerignore keeps target/ out"
    );
}
