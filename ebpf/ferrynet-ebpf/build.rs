//! aya-build compiles this crate with `-Clink-arg=--btf`, which only bpf-linker understands. Fail
//! early, with a message that says how to get it, instead of deep inside the link step.
fn main() {
    println!("cargo:rerun-if-env-changed=TARGET");
    if !std::env::var("TARGET").unwrap_or_default().starts_with("bpf") {
        return;
    }
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => panic!("bpf-linker not found ({err}); run ./bootstrap.sh"),
    }
}
