//! Generates the prost/tonic code from proto/*.proto with a vendored protoc, set for this build
//! script only: raft's own build rejects a modern protoc, so PROTOC must never be set globally.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; the variable only reaches this process.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(&["proto/kerfs.proto"], &["proto"])?;
    Ok(())
}
