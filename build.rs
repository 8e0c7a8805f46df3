//! Stamps the git commit into the binary for `herald --version` (`HERALD_COMMIT`), "unknown"
//! outside a git checkout. Reruns only when HEAD moves, not on every source change.

use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=HERALD_COMMIT={commit}");
    // Watch only files that exist (a missing one would rerun this on every build): HEAD, the
    // branch it points at (loose, or in packed-refs), in the common git directory of worktrees.
    let git = |what: &str| {
        Command::new("git")
            .args(["rev-parse", what])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    if let (Some(dir), Some(common)) = (git("--git-dir"), git("--git-common-dir")) {
        let head = format!("{dir}/HEAD");
        let mut watch = vec![head.clone(), format!("{common}/packed-refs")];
        if let Ok(text) = std::fs::read_to_string(&head)
            && let Some(reference) = text.strip_prefix("ref: ")
        {
            watch.push(format!("{common}/{}", reference.trim()));
        }
        for path in watch.into_iter().filter(|p| std::path::Path::new(p).exists()) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
