//! Workspace rules that keep the code base easy to carry on (rust-analyzer's "tidy" idea):
//! they fail the suite the moment a change breaks one.

use std::fs;

use vmgov_tests::{files_with_suffix, read_toml, workspace_members, workspace_root};

#[test]
fn every_module_has_a_doc_comment() {
    let root = workspace_root();
    let mut missing = Vec::new();
    for member in workspace_members().unwrap() {
        for file in files_with_suffix(&root.join(&member).join("src"), ".rs").unwrap() {
            let text = fs::read_to_string(&file).unwrap();
            if !text
                .lines()
                .take_while(|l| l.starts_with("//") || l.is_empty())
                .any(|l| l.starts_with("//!"))
            {
                missing.push(file.strip_prefix(&root).unwrap_or(&file).display().to_string());
            }
        }
    }
    assert!(missing.is_empty(), "modules without a //! doc at the top: {missing:?}");
}

#[test]
fn every_member_inherits_lints_and_workspace_versions() {
    let root = workspace_root();
    for member in workspace_members().unwrap() {
        let manifest = read_toml(&root.join(&member).join("Cargo.toml")).unwrap();
        let lints =
            manifest.get("lints").and_then(|l| l.get("workspace")).and_then(toml::Value::as_bool);
        assert_eq!(lints, Some(true), "{member}/Cargo.toml must say [lints] workspace = true");
        for section in ["dependencies", "dev-dependencies", "build-dependencies"] {
            let Some(deps) = manifest.get(section).and_then(toml::Value::as_table) else {
                continue;
            };
            for (name, spec) in deps {
                let inherited = spec.get("workspace").and_then(toml::Value::as_bool) == Some(true);
                assert!(
                    inherited,
                    "{member}/Cargo.toml [{section}] {name}: versions live once in the workspace's \
                     [workspace.dependencies]; write `{name}.workspace = true`"
                );
            }
        }
    }
}

#[test]
fn architecture_md_maps_every_crate_and_module() {
    let root = workspace_root();
    let arch = fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    for member in workspace_members().unwrap() {
        assert!(arch.contains(&format!("{member}/")), "ARCHITECTURE.md does not mention {member}/");
    }
    for member in workspace_members().unwrap() {
        for file in files_with_suffix(&root.join(&member).join("src"), ".rs").unwrap() {
            let module = file.file_stem().and_then(|s| s.to_str()).unwrap();
            if !["lib", "main"].contains(&module) {
                let named = if module == "mod" {
                    let dir =
                        file.parent().and_then(|d| d.file_name()).and_then(|d| d.to_str()).unwrap();
                    format!("{dir}/")
                } else {
                    format!("{module}.rs")
                };
                assert!(arch.contains(&named), "ARCHITECTURE.md does not map {}", file.display());
            }
        }
    }
}

#[test]
fn ci_runs_the_readmes_test_command() {
    let root = workspace_root();
    let readme = fs::read_to_string(root.join("README.md")).unwrap();
    let ci = fs::read_to_string(root.join(".ci/run")).unwrap();
    assert!(readme.contains("tools/test"), "README.md must show the test command");
    assert!(
        ci.lines().any(|l| l.trim_start().starts_with("tools/test")),
        ".ci/run must run tools/test"
    );
}
