//! Structure rules that the compiler does not check (ARCHITECTURE.md,
//! "Invariants"): the services own their dependencies and never reach into
//! `AppState`, which is only the handlers' context.

use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn services_do_not_import_the_server_state() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut checked = 0;
    for service in ["scheduler", "approvals", "memory", "secrets"] {
        let mut files = Vec::new();
        rust_files(&root.join(service), &mut files);
        assert!(!files.is_empty(), "src/{service} has no files");
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for (n, line) in text.lines().enumerate() {
                if line.trim_start().starts_with("//") {
                    continue;
                }
                assert!(
                    !line.contains("crate::state") && !line.contains("AppState"),
                    "{}:{}: a service reaches into the server state: {line}",
                    f.display(),
                    n + 1
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} files checked");
}
